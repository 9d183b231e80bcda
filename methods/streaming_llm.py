"""StreamingLLM — Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024, 2309.17453).

Keeps the first `n_sink` tokens (attention sinks) and the most recent `budget - n_sink` tokens. As in the
paper the window rolls during decoding too (`evict_during_decode`), so the cache never grows past the budget.
On the GPU decode path (kvbench/fast_decode.py) the window is a ring buffer (`decode_ring`), or, over heads
holding more than the budget (a question fed on top), an eviction on the device (`decode_eviction`).
"""
from dataclasses import dataclass

import torch

from kvbench.fast_decode import DecodeEviction
from kvbench.method import LayerContext, ScoredEviction, register_method


@register_method("streaming_llm")
@dataclass
class StreamingLLM(ScoredEviction):
    n_sink: int = 4
    evict_during_decode: bool = True

    paper = "StreamingLLM: Efficient Streaming Language Models with Attention Sinks (2309.17453)"
    family = "eviction: sink + recent window"

    def __post_init__(self):
        super().__post_init__()
        if self.budget is not None and self.budget <= self.n_sink:
            raise ValueError(f"budget={self.budget} must exceed method.n_sink={self.n_sink} for streaming_llm")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        # Rows of a head may be out of order after decode-time eviction: rank by original position.
        if ctx.layer.is_uniform():
            pos = ctx.layer.dense()[2].float()
        else:
            L = max(ctx.layer.head_lengths)
            pos = torch.full((ctx.n_kv, L), -1.0)
            for h in range(ctx.n_kv):
                p = ctx.layer.head(h)[2]
                pos[h, : p.numel()] = p.float().cpu()
            pos = pos.to(ctx.layer.keys.device)
        return torch.where(pos < self.n_sink, torch.full_like(pos, float("inf")), pos)

    def decode_ring(self) -> tuple[int, int] | None:
        return (self.n_sink, self.budget) if self.evict_during_decode and self.budget is not None else None

    def decode_eviction(self, cache) -> DecodeEviction:
        """`on_decode` for the device: each head over the budget drops its oldest non-sink row (no budget, or
        no decode-time eviction: nothing is evicted)."""
        cap = self.budget if self.evict_during_decode else None
        return DecodeEviction(caps=(cap,) * len(cache.kv), rank="position", n_sink=self.n_sink)

    def on_decode(self, ctx: LayerContext) -> None:
        if not self.evict_during_decode:
            return
        layer = ctx.layer
        for h, n in enumerate(layer.head_lengths):
            cap = self.budget if self.budget is not None else n
            while layer.head_lengths[h] > max(cap, self.n_sink + 1):
                pos = layer.head(h)[2]
                masked = torch.where(pos < self.n_sink, torch.full_like(pos, torch.iinfo(pos.dtype).max), pos)
                layer.remove(h, int(masked.argmin()))  # the oldest token after the sinks
