"""Recent-window baseline: keep only the last `budget` tokens of each head (a sliding window without the
attention sinks of StreamingLLM). With `evict_during_decode` the window keeps rolling while generating, so
the cache never holds more than `budget` tokens per head. On the GPU decode path (kvbench/fast_decode.py) the
window is a ring buffer (`decode_ring`), or, over heads holding more than the budget (a question fed on top),
an eviction on the device (`decode_eviction`)."""
from dataclasses import dataclass

import torch

from kvbench.fast_decode import DecodeEviction
from kvbench.method import LayerContext, ScoredEviction, register_method


def head_positions(ctx: LayerContext) -> torch.Tensor:
    """(n_kv, L) original positions of every head's rows, -1 past a head's length (ragged layers)."""
    layer = ctx.layer
    if layer.is_uniform():
        return layer.dense()[2]
    L = max(layer.head_lengths)
    pos = torch.full((layer.n_heads, L), -1, dtype=torch.long, device=layer.keys.device)
    for h in range(layer.n_heads):
        p = layer.head(h)[2]
        pos[h, : p.numel()] = p
    return pos


@register_method("recent")
@dataclass
class Recent(ScoredEviction):
    evict_during_decode: bool = True

    paper = "baseline: most recent tokens only"
    family = "baseline"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return head_positions(ctx).float()  # newer = higher

    def decode_ring(self) -> tuple[int, int] | None:
        return (0, self.budget) if self.evict_during_decode and self.budget is not None else None

    def decode_eviction(self, cache) -> DecodeEviction:
        """`on_decode` for the device: each head over the budget drops its oldest row."""
        return DecodeEviction(caps=(self.budget if self.evict_during_decode else None,) * len(cache.kv),
                              rank="position")

    def on_decode(self, ctx: LayerContext) -> None:
        if not self.evict_during_decode or self.budget is None:
            return
        layer = ctx.layer
        for h in range(layer.n_heads):
            while layer.head_lengths[h] > self.budget:
                layer.remove(h, int(layer.head(h)[2].argmin()))  # the oldest row
