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

from kvbench.cache import PendingLengths
from kvbench.method import LayerContext, ScoredEviction, build_method, keep_top, register_method
from kvbench.methods.kernels.adakv_budgets import adakv_layout, exact_on, head_shares_ref, window_counts_ref
from kvbench.methods.snapkv import WindowQueries

SCORERS = ("snapkv", "pyramidkv", "knorm", "tova", "cake", "random")


def adaptive_head_budgets(scores: torch.Tensor, budget: int, alpha: float) -> list[int]:
    """Per-head kept counts (their +inf tokens included) for (n_kv, L) scores, summing to
    min(budget, L) × n_kv: the official global top-k, then the safeguard mix (see the module docstring).
    Ties in the global top-k go to the earlier head, then the earlier token (a stable sort). One host sync
    (the window and top-k counts together); the mix runs on the host, in float32 like the official code."""
    budget = min(budget, scores.shape[1])
    n_forced, counts = global_topk_counts(scores, budget).tolist()
    return safeguard_mix(n_forced, counts, budget, scores.shape[1], alpha)


def global_topk_counts(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """(2, n_kv) int64 on the scores' device, no sync: each head's +inf (window) tokens, and its share of the
    unconstrained global top-k over every head's other scores (k = the heads' free budgets together). In torch
    ops: the host cut's and the CPU path's, and the reference of the device version (`adakv_layout`)."""
    from kvbench.methods.kernels.topk_select import topk_select
    h, L = scores.shape
    masked, n_forced_t, total_t = window_counts_ref(scores, budget)
    # the global top-k as one row of h*L scores (ties: the earlier head, then the earlier token), k on the
    # device; h * budget slots bound it on the host. Then per head how many of the first total_t it holds.
    # (A global sort, then a scatter_add of h*L ones into n_kv counters, took several times longer on a GPU.)
    kept = topk_select(masked.view(1, -1), total_t, h * budget)[0]
    return torch.stack([n_forced_t, head_shares_ref(kept, total_t, h, L)])


def safeguard_mix(n_forced: list[int], counts: list[int], budget: int, L: int, alpha: float) -> list[int]:
    """The host half of `adaptive_head_budgets`: from the window and global top-k counts, each head's kept
    count (window included)."""
    h = len(counts)
    base = [max(0, budget - f) for f in n_forced]                  # per-head free budget
    room = [L - f for f in n_forced]                               # scorable tokens per head
    total = sum(base)
    if total == 0:
        return [min(f, budget) for f in n_forced]
    counts = torch.tensor(counts)
    # 2. the safeguard mix as the official code: int64 counts × (1 − alpha) in float32, + int(alpha · base)
    floor_cap = torch.tensor([int(base_h * float(alpha)) for base_h in base])
    raw = counts * (1.0 - float(alpha)) + floor_cap
    out = torch.minimum(torch.round(raw), torch.tensor(room, dtype=raw.dtype)).long().tolist()
    resid = [float(r) - o for r, o in zip(raw.tolist(), out)]      # > 0: rounded down
    diff = total - sum(out)
    while diff > 0:   # the heads rounded down the most (then the earlier) get one more, within their room
        i = max((i for i in range(h) if out[i] < room[i]), key=lambda i: (resid[i], -i))
        out[i], resid[i], diff = out[i] + 1, resid[i] - 1, diff - 1
    while diff < 0:   # the heads rounded up the most (then the earlier) give one back
        i = min((i for i in range(h) if out[i] > 0), key=lambda i: (resid[i], i))
        out[i], resid[i], diff = out[i] - 1, resid[i] + 1, diff + 1
    return [o + f for o, f in zip(out, n_forced)]


@register_method("adakv")
@dataclass
class AdaKV(WindowQueries, ScoredEviction):
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

    # The per-head counts are known on the device only. Read at each layer, they would stall the GPU at every
    # layer of the prefill (it drains, then waits for the host to launch the next layer). On CUDA the cut is
    # instead queued whole on the device (`cut_on_device`): the mix there (methods/kernels/adakv_budgets.py), then a
    # per-head top-k and one gather whose sizes the host knows; the layers' host lengths wait in a PendingLengths
    # queue, read once after the prefill (`after_prefill`). Not with storage formats (they encode a layer from its
    # host lengths right after its compression), nor where the device mix would not be exact.
    DEFER = "auto"  # "auto" (on CUDA) | "always" (tests, CPU: the torch version of the device mix) | "never"

    def reset(self) -> None:
        super().reset()
        self._pending = PendingLengths()

    def cut(self, layer, scores: torch.Tensor, budget: int) -> None:
        defer = self.DEFER == "always" or (self.DEFER == "auto" and layer.keys.is_cuda)
        budget = min(budget, scores.shape[1])
        if not (defer and layer.is_uniform() and not self.formats()
                and exact_on(scores.device, scores.shape[0], budget, float(self.alpha_safeguard))):
            return super().cut(layer, scores, budget)
        self.cut_on_device(layer, scores, budget)

    def cut_on_device(self, layer, scores: torch.Tensor, budget: int) -> None:
        """`cut` with no host read: the mix on the device gives the kept layout, whose total the host knows:
        n_kv * budget. The heads keep out + f (f: a head's +inf tokens), out summing to the free budgets
        sum(budget - f), so budget each on average; or, no head having a free budget, min(f, budget) = budget.
        That rests on the heads' +inf tokens being all <= budget or all >= budget, as with every scorer here (they
        are the observation window, the same columns in every head); the read after the prefill checks it
        (PendingLengths.resolve raises otherwise)."""
        alpha = float(self.alpha_safeguard)
        layout = adakv_layout(scores, budget, alpha)
        if getattr(self, "_pending", None) is None:  # used without reset() (direct calls)
            self._pending = PendingLengths()
        keep_top(layer, scores, layout, total=scores.shape[0] * budget, pending=self._pending)

    def after_prefill(self, cache) -> None:
        if getattr(self, "_pending", None) is not None:
            self._pending.resolve()  # every layer cut on the device: one device-to-host read
        super().after_prefill(cache)
