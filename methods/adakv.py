"""Ada-KV — Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference" (NeurIPS 2025, 2407.11550).

Head-adaptive budgets: instead of every KV head keeping `budget` tokens, the layer's total (budget × n_kv)
goes to the highest scores over *all* heads of the layer (a global top-k), so heads with dispersed attention
get more room than heads with concentrated attention. A safeguard guarantees each head `alpha_safeguard` of
its fair share of the free (non-window) budget. Ada-KV wraps another scorer (`scorer=snapkv` is Ada-SnapKV,
`scorer=pyramidkv` Ada-PyramidKV: its layer budgets too); tokens the scorer marks +inf (its observation
window) are always kept and count towards the head's budget.
Simplification: the official code rounds the safeguarded counts (so a layer may be off by a few tokens);
we guarantee the floor first and hand out the rest by one global top-k, so a layer keeps exactly
budget × n_kv tokens.
"""
from dataclasses import dataclass, field, fields

import torch

from kvbench.method import LayerContext, ScoredEviction, build_method, register_method

SCORERS = ("snapkv", "pyramidkv", "knorm", "tova", "cake", "random")


def adaptive_head_budgets(scores: torch.Tensor, budget: int, alpha: float) -> list[int]:
    """Per-head kept counts for (n_kv, L) scores summing to min(budget × n_kv, n_kv × L).

    Each head first gets its +inf tokens plus its top floor(alpha × free) others (free = budget − #inf);
    the remaining slots go to the largest remaining scores of any head. Batched over heads on the device:
    one host sync (the counts), so a GPU prefill is not stalled once per head."""
    h, L = scores.shape
    budget = min(budget, L)
    s = scores.float()
    forced = torch.isinf(s).sum(dim=1)
    # float64 like Python's int(alpha * free), so the floor agrees with the hand-worked rule
    guard = forced + torch.floor(float(alpha) * (budget - forced).clamp(min=0).double()).long()
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # ties: the earlier token first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=s.device).expand(h, L))
    s = torch.where(rank < guard.clamp(max=L)[:, None], float("inf"), s)
    top = torch.topk(s.reshape(-1), budget * h).indices
    return torch.bincount(top // L, minlength=h).tolist()


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
