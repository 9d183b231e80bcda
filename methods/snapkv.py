"""SnapKV — Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2404.14469).

The last `window_size` prompt tokens (the observation window) vote: their attention over the prefix is
averaged over the window and over the query heads of each KV head (GQA), smoothed with a 1-D pooling of
`kernel_size`, and the top `budget - window_size` prefix tokens are kept together with the window.
"""
from dataclasses import dataclass

import torch

from kvbench.method import LayerContext, ScoredEviction, pool1d, register_method, window_attention


def snap_scores(ctx: LayerContext, window: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """(n_kv, L) scores; the window's own tokens get +inf (always kept)."""
    keys = ctx.layer.dense()[0] if ctx.layer.is_uniform() else None
    if keys is None:
        raise ValueError("snapkv scores a freshly prefilled (uniform) layer")
    L = keys.shape[1]
    w = min(window, L, ctx.query.shape[1])
    probs = window_attention(ctx.query, keys, w, ctx.scaling)       # (h, g, w, L)
    votes = probs.mean(dim=(1, 2))                                  # (h, L)
    scores = votes.clone()
    scores[:, : L - w] = pool1d(votes[:, : L - w], kernel_size, pooling)
    scores[:, L - w:] = float("inf")
    return scores


@register_method("snapkv")
@dataclass
class SnapKV(ScoredEviction):
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (2404.14469)"
    family = "eviction: observation-window attention"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return snap_scores(ctx, self.window_size, self.kernel_size, self.pooling)
