"""WindowKV — Zuo et al., "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for Efficient LLM
Inference" (2503.17922).

Instead of single tokens, WindowKV keeps *windows* of `review_window_size` consecutive prompt tokens. The
observation suffix (the last `suffix_size` tokens, always kept) attends over the prefix; the attention summed
over the suffix queries gives one score per window, as the official `get_window_score`: "average" (for
summarisation-like tasks) is the mean over every head and token of the window; "max" (for tasks that need one
salient detail) takes in each query head the window's top review_window_size // 2 tokens and averages those
values over tokens and heads. The lowest windows are dropped until the layer fits its budget. Layers come in
groups of `shared_layers`: the first layer of a group selects the windows and the others reuse its indices
(intra-group index sharing). Group budgets decrease arithmetically with depth, the last group's being
B · shared_layers / beta as in the official code; the first group's is set so the mean over *layers* is B
(the official first = 2B − last assumes n_layers a multiple of shared_layers: with a shorter last group
that rule spends 3–6% more than B, e.g. 30 layers in groups of 8). Budgets are rounded down, so a layer
never keeps more than B on average.
Simplification: the paper picks "max" or "average" per task with a trained BERT classifier; here it is a knob
(`window_select`). A layer keeps whole windows, so it may keep up to one window fewer than its budget, never more.
"""
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from kvbench.method import LayerContext, ScoredEviction, register_method, window_attention
from kvbench.methods.snapkv import WindowQueries

SELECT = ("max", "average")


def group_budgets(avg: int, n_layers: int, shared: int, beta: float) -> list[int]:
    """Per-layer prefix budgets: arithmetic decay over groups of `shared` layers (the last group may be
    shorter), the mean over layers at most avg and within one token of it (see the module docstring)."""
    n_groups = max(1, -(-n_layers // shared))
    if n_groups == 1:
        return [avg] * n_layers
    sizes = [min(shared, n_layers - g * shared) for g in range(n_groups)]
    t = [Fraction(g, n_groups - 1) for g in range(n_groups)]       # 0 at the first group, 1 at the last
    last = min(avg, int(avg * shared // beta))
    # sum_g sizes[g] * (first * (1 - t_g) + last * t_g) == avg * n_layers
    first = (avg * n_layers - last * sum(n * x for n, x in zip(sizes, t))) / sum(n * (1 - x) for n, x in zip(sizes, t))
    raw = [first * (1 - x) + last * x for x in t]
    per_group = [math.floor(r) for r in raw]
    spare = avg * n_layers - sum(n * b for n, b in zip(sizes, per_group))
    for g in sorted(range(n_groups), key=lambda g: (-(raw[g] - per_group[g]), g)):  # rounded down the most first
        if sizes[g] <= spare:
            per_group[g] += 1
            spare -= sizes[g]
    return [per_group[i // shared] for i in range(n_layers)]


def window_scores(attn_sum: torch.Tensor, size: int, select: str) -> torch.Tensor:
    """attn_sum (h, P): per-token scores of the prefix, one row per query head. Returns one score per window
    of `size` tokens (the last may be shorter): "average", the mean over the window's heads and tokens;
    "max", in each head the window's top size // 2 tokens (all of a shorter one if fewer), averaged over
    those tokens and the heads (the official `torch.topk(window, k)` on the (heads, tokens) window)."""
    P = attn_sum.shape[1]
    out = []
    for s in range(0, P, size):
        win = attn_sum[:, s:s + size]
        if select == "average":
            out.append(win.mean())
        else:
            k = min(max(1, size // 2), win.shape[1])
            out.append(torch.topk(win, k, dim=1).values.mean())
    return torch.stack(out)


@register_method("windowkv")
@dataclass
class WindowKV(WindowQueries, ScoredEviction):
    review_window_size: int = 8
    suffix_size: int = 32
    shared_layers: int = 8
    beta: float = 14.0
    window_select: str = "max"
    shared: dict = field(default_factory=dict, repr=False)  # group -> kept window indices

    paper = "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection (2503.17922)"
    family = "eviction: windows of consecutive tokens, group-shared indices"
    window_knob = "suffix_size"

    def __post_init__(self):
        super().__post_init__()
        if self.window_select not in SELECT:
            raise ValueError(f"method.window_select={self.window_select!r}; allowed: {', '.join(SELECT)}")
        for k in ("review_window_size", "suffix_size", "shared_layers"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"method.{k}={getattr(self, k)!r}; allowed: a positive integer")

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("budget", "compression_ratio", "review_window_size", "suffix_size",
                                               "shared_layers", "beta", "window_select")}

    def reset(self) -> None:
        super().reset()
        self.shared = {}

    def kept_windows(self, ctx: LayerContext, prefix_budget: int, n_prefix: int, w: int) -> list[int]:
        group = ctx.layer_idx // self.shared_layers
        size = self.review_window_size
        n_win = -(-n_prefix // size)
        if ctx.layer_idx % self.shared_layers == 0 or group not in self.shared:
            keys = ctx.layer.dense()[0]
            attn = window_attention(ctx.query, keys, w, ctx.scaling)[..., :n_prefix].sum(dim=2).flatten(0, 1)
            scores = window_scores(attn, size, self.window_select)
            # best windows first (earlier on ties) while they fit: the official "drop the ceil(excess / size)
            # lowest windows", except that a short last window can never push the layer past its budget
            order = sorted(range(n_win), key=lambda i: (-float(scores[i]), i))
            chosen, used = [], 0
            for i in order:
                n_i = min(size, n_prefix - i * size)
                if used + n_i <= prefix_budget:
                    chosen.append(i)
                    used += n_i
            self.shared[group] = sorted(chosen)
        return [i for i in self.shared[group] if i < n_win]

    def compress_layer(self, ctx: LayerContext) -> None:
        ctx = self.window_tail().extend(ctx)  # the window's queries across prefill chunks
        layer = ctx.layer
        if not layer.is_uniform():
            raise ValueError("windowkv compresses a freshly prefilled (uniform) layer")
        L = layer.head_lengths[0]
        avg = self.target(L)
        if avg >= L:
            return
        w = min(self.suffix_size, avg, ctx.query.shape[1])
        n_prefix = L - w
        prefix_budget = group_budgets(avg - w, ctx.n_layers, self.shared_layers, self.beta)[ctx.layer_idx]
        if prefix_budget >= n_prefix:
            return
        size = self.review_window_size
        idx = [t for i in self.kept_windows(ctx, prefix_budget, n_prefix, w)
               for t in range(i * size, min((i + 1) * size, n_prefix))]
        idx = torch.tensor(idx + list(range(n_prefix, L)), dtype=torch.long, device=layer.keys.device)
        layer.keep(idx.expand(layer.n_heads, -1))
