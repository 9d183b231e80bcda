"""TOVA — Oren et al., "Transformers are Multi-State RNNs" (Token Omission Via Attention, 2401.06104).

The cache is a fixed-size state: whenever it holds more than `budget` tokens, the tokens with the lowest
attention from the *current* (last) query are dropped. After prefill the last prompt token's attention picks
the `budget` survivors; while decoding, every step evicts the lowest-attended token (it may be the new one).
As the paper and its official code (`TOVACache.reduce`: the last query's attention averaged over all heads,
one top-k for the layer) the default `per_head=False` decides per layer from the head-averaged attention of
the last token and drops the same tokens in every head. `per_head=True` is a knob (not in the paper): scores
averaged over the query heads of each KV head only, so every KV head keeps its own tokens.
`decode_eviction` declares the same decode-time rule for the GPU decode path (kvbench/fast_decode.py), which
evicts on the device inside its CUDA graph.
"""
from dataclasses import dataclass, field

import torch

from kvbench.fast_decode import DecodeEviction
from kvbench.method import LayerContext, ScoredEviction, register_method, window_attention


@register_method("tova")
@dataclass
class TOVA(ScoredEviction):
    per_head: bool = False  # False: the paper's one choice per layer; True: each KV head on its own
    caps: dict = field(default_factory=dict, repr=False)  # layer -> tokens per head fixed at prefill

    paper = "TOVA: Transformers are Multi-State RNNs (2401.06104)"
    family = "eviction: last-query attention, decode-time"
    needs_decode_probs = True

    def describe(self) -> dict:
        return {"budget": self.budget, "compression_ratio": self.compression_ratio, "per_head": self.per_head}

    def reset(self) -> None:
        self.caps = {}

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if not ctx.layer.is_uniform():
            raise ValueError("tova scores a freshly prefilled (uniform) layer")
        keys = ctx.layer.dense()[0]
        probs = window_attention(ctx.query, keys, 1, ctx.scaling)[:, :, 0]  # (h, g, L): the last query
        s = probs.mean(dim=1)
        return s.mean(dim=0, keepdim=True).expand_as(s) if not self.per_head else s

    def compress_layer(self, ctx: LayerContext) -> None:
        super().compress_layer(ctx)
        self.caps[ctx.layer_idx] = max(ctx.layer.head_lengths)

    def decode_eviction(self, cache) -> DecodeEviction:
        """`on_decode` for the device: each head over its cap drops the row the new token attends to least
        (per_head=False: the least summed over all heads, the same row in every head)."""
        caps = tuple(self.budget if self.budget is not None else self.caps.get(i) for i in range(len(cache.kv)))
        return DecodeEviction(caps=caps, rank="attention", shared=not self.per_head)

    def on_decode(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        cap = self.budget if self.budget is not None else self.caps.get(ctx.layer_idx)
        if cap is None:
            return
        if self.per_head:
            for h in range(layer.n_heads):
                p = ctx.probs[h].clone()
                while layer.head_lengths[h] > cap:
                    j = int(p.argmin())
                    layer.remove(h, j)
                    p[j] = p[-1]  # remove() moved the last row into slot j
                    p = p[:-1]
        else:
            # every head holds the same positions in the same row order (same ops on each), so one index fits all
            p = torch.stack(ctx.probs).sum(0)
            while layer.head_lengths[0] > cap:
                j = int(p.argmin())
                for h in range(layer.n_heads):
                    layer.remove(h, j)
                p[j] = p[-1]
                p = p[:-1]
