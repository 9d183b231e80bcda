"""Knorm — Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(EMNLP 2024, 2406.11430).

Keys with a *low* L2 norm receive high attention, so each head keeps the `budget` tokens whose key norm is
lowest. No attention is computed: the score only needs the cached keys (works with flash attention).
"""
from dataclasses import dataclass

import torch

from kvbench.method import LayerContext, ScoredEviction, register_method


def knorm_scores(ctx: LayerContext) -> torch.Tensor:
    """(n_kv, L): minus the key norm (higher = keep); rows past a ragged head's length get -inf."""
    layer = ctx.layer
    if layer.is_uniform():
        return -layer.dense()[0].float().norm(dim=-1)
    L = max(layer.head_lengths)
    out = torch.full((layer.n_heads, L), float("-inf"), device=layer.keys.device)
    for h in range(layer.n_heads):
        k = layer.head(h)[0]
        out[h, : k.shape[0]] = -k.float().norm(dim=-1)
    return out


@register_method("knorm")
@dataclass
class Knorm(ScoredEviction):
    paper = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (2406.11430)"
    family = "eviction: key norm"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return knorm_scores(ctx)
