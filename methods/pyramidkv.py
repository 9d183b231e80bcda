"""PyramidKV — Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (2406.02069).

SnapKV's scoring with per-layer budgets that shrink linearly with depth (more in lower layers), keeping the
same average. The allocation follows the official code (KVCache-Factory, `PyramidKVCluster.update_kv`), for a
budget B (window included), window w, free = B - w and a context of L tokens:
- L <= B: nothing is dropped;
- L < 2·free: the pyramid cannot be built (its bottom layer would need more than the context): plain SnapKV,
  every layer keeps B;
- otherwise the non-window budgets span [min, max] from the bottom layer (max) to the top (min), with
  min = ⌊free / beta⌋ and max = 2·free − min; when max would exceed the prefix L − w, the official
  rebalancing sets max = L − w and min = 2·free − max. Every layer also keeps its observation window.
So the mean kept per layer equals B whenever L >= B. One deviation, rounding only: the official code steps
by ⌊(max − min) / (n_layers − 1)⌋, which spends a little more than B on average (e.g. B = 512, w = 32,
32 layers: mean 518.5); we interpolate exactly and round so the layers sum to n_layers · B.
A budget below the window shrinks the window to the budget (see snapkv), so every layer keeps the last B.
"""
import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from kvbench.method import LayerContext, ScoredEviction, register_method

from kvbench.methods.snapkv import WindowQueries, snap_scores


def pyramid_budgets(avg_budget: int, window: int, n_layers: int, beta: float,
                    n_tokens: int | None = None) -> list[int]:
    """Per-layer kept tokens (window included) for a context of `n_tokens` (None: long enough for any
    pyramid); their mean is exactly avg_budget when n_tokens >= avg_budget (see the module docstring)."""
    return list(_pyramid_budgets(int(avg_budget), int(window), int(n_layers), float(beta),
                                 None if n_tokens is None else int(n_tokens)))


@functools.lru_cache(maxsize=1024)  # every layer's hook asks twice per prefill: 0.7 ms each on a 2-core CPU
def _pyramid_budgets(avg_budget: int, window: int, n_layers: int, beta: float, n_tokens: int | None) -> tuple:
    if n_tokens is not None and n_tokens <= avg_budget:
        return (n_tokens,) * n_layers
    window = min(window, avg_budget)
    free = avg_budget - window
    if n_layers == 1 or free == 0 or (n_tokens is not None and n_tokens < 2 * free):
        return (avg_budget,) * n_layers
    lo = int(math.floor(free / beta))
    hi = 2 * free - lo
    if n_tokens is not None and hi >= n_tokens - window:  # the bottom layers would exceed the prefix
        hi = n_tokens - window
        lo = 2 * free - hi
    raw = [hi - Fraction(i * (hi - lo), n_layers - 1) for i in range(n_layers)]  # sums to n_layers * free
    out = [math.floor(x) for x in raw]
    short = n_layers * free - sum(out)
    # the rounding's remainder: +1 to the layers rounded down the most (earlier first), never above hi
    for i in sorted(range(n_layers), key=lambda i: (-(raw[i] - out[i]), i))[:short]:
        out[i] += 1
    return tuple(x + window for x in out)


@register_method("pyramidkv")
@dataclass
class PyramidKV(WindowQueries, ScoredEviction):
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
        return pyramid_budgets(avg, self.window_size, n_layers, self.beta, n_tokens)[layer_idx]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        budget = self.layer_budget(ctx.layer_idx, ctx.n_layers, max(ctx.layer.head_lengths))
        return snap_scores(ctx, self.window_size, self.kernel_size, self.pooling, budget)
