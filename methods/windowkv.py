"""WindowKV — Zuo et al., "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for Efficient LLM
Inference" (2503.17922).

Instead of single tokens, WindowKV keeps *windows* of `review_window_size` consecutive prompt tokens. The
observation suffix (the last `suffix_size` tokens, always kept) attends over the prefix; the attention summed
over the suffix queries is aggregated per window over all heads, either as the mean of the window
("average", for summarisation-like tasks) or as the mean of its top half ("max", for tasks that need one
salient detail); the lowest windows are dropped until the layer fits its budget. Layers come in groups of
`shared_layers`: the first layer of a group selects the windows and the others reuse its indices
(intra-group index sharing). Group budgets decrease arithmetically with depth (first = 2B − last,
last = B · shared_layers / beta), averaging B.
Simplification: the paper picks "max" or "average" per task with a trained BERT classifier; here it is a knob
(`window_select`). A layer keeps whole windows, so it may keep up to one window fewer than its budget, never more.
"""
from dataclasses import dataclass, field

import torch

from kvbench.method import LayerContext, ScoredEviction, register_method, window_attention

SELECT = ("max", "average")


def group_budgets(avg: int, n_layers: int, shared: int, beta: float) -> list[int]:
    """Per-layer prefix budgets: arithmetic decay over groups of `shared` layers, mean = avg (up to rounding)."""
    n_groups = max(1, -(-n_layers // shared))
    if n_groups == 1:
        return [avg] * n_layers
    last = min(avg, int(avg * shared // beta))
    first = 2 * avg - last
    step = (first - last) / (n_groups - 1)
    per_group = [int(round(first - g * step)) for g in range(n_groups)]
    return [per_group[i // shared] for i in range(n_layers)]


def window_scores(attn_sum: torch.Tensor, size: int, select: str) -> torch.Tensor:
    """attn_sum (h, P): per-token scores of the prefix. Returns one score per window of `size` tokens,
    aggregated over all heads: the mean ("average") or the mean of the top size//2 values ("max")."""
    P = attn_sum.shape[1]
    out = []
    for s in range(0, P, size):
        win = attn_sum[:, s:s + size].reshape(-1)
        if select == "average":
            out.append(win.mean())
        else:
            k = min(max(1, size // 2), win.numel())
            out.append(torch.topk(win, k).values.mean())
    return torch.stack(out)


@register_method("windowkv")
@dataclass
class WindowKV(ScoredEviction):
    review_window_size: int = 8
    suffix_size: int = 32
    shared_layers: int = 8
    beta: float = 14.0
    window_select: str = "max"
    shared: dict = field(default_factory=dict, repr=False)  # group -> kept window indices

    paper = "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection (2503.17922)"
    family = "eviction: windows of consecutive tokens, group-shared indices"

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
