"""PyramidKV — Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (2406.02069).

SnapKV's scoring with per-layer budgets that shrink linearly with depth (more in lower layers), keeping the
same average. Following the paper's code: the non-window budget B-w of the average layer spans
[min, max] with min = (B-w)/beta and max = 2(B-w) - min; every layer also keeps its observation window.
"""
from dataclasses import dataclass

import torch

from kvbench.method import LayerContext, ScoredEviction, register_method

from kvbench.methods.snapkv import snap_scores


def pyramid_budgets(avg_budget: int, window: int, n_layers: int, beta: float) -> list[int]:
    """Per-layer kept tokens (window included); their mean equals avg_budget up to rounding."""
    free = max(0, avg_budget - window)
    if n_layers == 1:
        return [avg_budget]
    lo = free / beta
    hi = 2 * free - lo
    step = (hi - lo) / (n_layers - 1)
    raw = [hi - i * step + window for i in range(n_layers)]
    out = [int(round(x)) for x in raw]
    # rounding drift goes to the first layers so the mean stays exact
    drift = avg_budget * n_layers - sum(out)
    i = 0
    while drift != 0:
        out[i % n_layers] += 1 if drift > 0 else -1
        drift += -1 if drift > 0 else 1
        i += 1
    return out


@register_method("pyramidkv")
@dataclass
class PyramidKV(ScoredEviction):
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    beta: float = 20.0

    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (2406.02069)"
    family = "eviction: observation window + pyramid layer budgets"

    def layer_budget(self, layer_idx: int, n_layers: int, n_tokens: int) -> int:
        avg = self.target(n_tokens)
        if avg >= n_tokens:
            return n_tokens
        return min(n_tokens, pyramid_budgets(avg, self.window_size, n_layers, self.beta)[layer_idx])

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return snap_scores(ctx, self.window_size, self.kernel_size, self.pooling)
