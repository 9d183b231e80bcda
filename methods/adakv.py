"""Ada-KV — Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference" (NeurIPS 2025, 2407.11550).

Head-adaptive budgets, following the official allocation (FFY0/AdaKV `AdaptiveSnapKVCluster`, the same in
KVCache-Factory's `AdaKVCluster`). The scorer's +inf tokens (its observation window) are always kept; the
rest of the layer's budget, base = budget − window per head, is shared out in two steps:
1. an unconstrained global top-k: the n_kv × base highest scores over *all* heads of the layer (window
   excluded) give each head a count c_h (heads with dispersed attention get more room);
2. the safeguard mix: head h keeps round(c_h · (1 − alpha) + ⌊alpha · base⌋) of its own highest scores
   (`alpha_safeguard`, the official `floor_alpha`; torch.round, half to even).
Ada-KV wraps another scorer (`scorer=snapkv` is Ada-SnapKV, `scorer=pyramidkv` Ada-PyramidKV: its layer
budgets too, the mix then using that layer's base as the official pyramid mode does).
One deviation, rounding only: where the rounded counts do not sum to n_kv × base (the official code then
keeps a few tokens more or fewer), the difference is taken from / given to the heads rounded the most
(one token each), so a layer keeps exactly budget × n_kv tokens. No head is given more than it holds.
"""
from dataclasses import dataclass, field, fields

import torch

from kvbench.method import LayerContext, ScoredEviction, build_method, register_method

SCORERS = ("snapkv", "pyramidkv", "knorm", "tova", "cake", "random")


def adaptive_head_budgets(scores: torch.Tensor, budget: int, alpha: float) -> list[int]:
    """Per-head kept counts (their +inf tokens included) for (n_kv, L) scores, summing to
    min(budget, L) × n_kv: the official global top-k, then the safeguard mix (see the module docstring).
    Ties in the global top-k go to the earlier head, then the earlier token (a stable sort)."""
    h, L = scores.shape
    budget = min(budget, L)
    s = scores.float()
    forced = torch.isinf(s) & (s > 0)
    n_forced = forced.sum(dim=1)                                   # (h,) the window, per head
    room = L - n_forced                                            # scorable tokens per head
    base = (budget - n_forced).clamp(min=0)                        # per-head free budget
    total = int(base.sum())
    if total == 0:
        return n_forced.clamp(max=budget).tolist()
    # 1. unconstrained global top-k over every head's non-window scores
    flat = torch.where(forced, float("-inf"), s).reshape(-1)
    top = torch.sort(flat, descending=True, stable=True).indices[:total]
    counts = torch.bincount(top // L, minlength=h).double()
    # 2. the safeguard mix, rounded as the official torch.round (half to even)
    floor_cap = torch.floor(float(alpha) * base.double())
    raw = counts * (1.0 - float(alpha)) + floor_cap
    out = torch.minimum(torch.round(raw), room.double())
    diff = total - int(out.sum())
    resid = raw - out                                              # > 0: rounded down
    while diff != 0:
        if diff > 0:
            ok = out < room.double()
            i = int(torch.where(ok, resid, float("-inf")).argmax())
            out[i] += 1
            diff -= 1
        else:
            ok = out > 0
            i = int(torch.where(ok, resid, float("inf")).argmin())
            out[i] -= 1
            diff += 1
        resid = raw - out
    return (out.long() + n_forced).tolist()


@register_method("adakv")
@dataclass
class AdaKV(ScoredEviction):
    scorer: str = "snapkv"
    alpha_safeguard: float = 0.2
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    beta: float = 20.0
    inner: object = field(default=None, repr=False)

    paper = "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (2407.11550)"
    family = "allocation: head-adaptive budgets (wraps a scorer)"

    def __post_init__(self):
        super().__post_init__()
        if self.scorer not in SCORERS:
            raise ValueError(f"method.scorer={self.scorer!r}; allowed: {', '.join(SCORERS)}")
        if not 0.0 <= float(self.alpha_safeguard) <= 1.0:
            raise ValueError(f"method.alpha_safeguard={self.alpha_safeguard!r}; allowed: 0 <= alpha <= 1")
        if self.inner is None:
            from kvbench.method import load_all_methods
            cls = load_all_methods()[self.scorer]
            mine = {"window_size": self.window_size, "kernel_size": self.kernel_size, "pooling": self.pooling,
                    "beta": self.beta}
            knobs = {f.name: mine[f.name] for f in fields(cls) if f.name in mine}
            self.inner = build_method(self.scorer, self.budget, self.compression_ratio, **knobs)

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("budget", "compression_ratio", "scorer", "alpha_safeguard",
                                               "window_size", "kernel_size", "pooling", "beta")}

    def layer_budget(self, layer_idx: int, n_layers: int, n_tokens: int) -> int:
        return self.inner.layer_budget(layer_idx, n_layers, n_tokens)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return self.inner.score(ctx)

    def head_budgets(self, scores: torch.Tensor, budget: int) -> list[int]:
        return adaptive_head_budgets(scores, budget, float(self.alpha_safeguard))
