"""SnapKV — Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2404.14469).

The last `window_size` prompt tokens (the observation window) vote: their attention over the prefix is
averaged over the window and over the query heads of each KV head (GQA), smoothed with a 1-D pooling of
`kernel_size`, and the top `budget - window_size` prefix tokens are kept together with the window.
Pooling as the official code: `F.max_pool1d` / `F.avg_pool1d` (padding kernel_size // 2, stride 1, avg with
count_include_pad=True), on the torch path and the Triton kernel alike.
A budget smaller than the window clamps the window to the budget (the official code asserts
budget > window): the layer then keeps the last `budget` prompt tokens, never dropping the last one.
Chunked prefill (`prefill_chunk>0`): the window's queries are carried across chunks (`QueryTail`, shared by
every method with an observation window), so a last chunk shorter than the window scores as a whole prompt.
"""
import dataclasses
from dataclasses import dataclass

import torch

from kvbench.method import LayerContext, ScoredEviction, pool1d, register_method, window_attention


class QueryTail:
    """The observation window's queries across prefill chunks (`prefill_chunk>0`). A method hook sees only the
    queries of the current forward, so a last chunk shorter than the window would shrink the window. Feed
    `observe` from `observe_prefill` (every chunk): it keeps, per layer, the last `size` queries of the chunks
    before the last one (a copy of at most `size` rows). `extend(ctx)` in `compress_layer` returns the context
    with those rows prepended to the last chunk's queries (still the last tokens of the layer's keys), or `ctx`
    unchanged when its own queries already cover the window (an unchunked prefill: no copy at all)."""

    def __init__(self, size: int):
        self.size = int(size)
        self.tail: dict[int, tuple[torch.Tensor, int]] = {}  # layer -> (queries, layer length after them)

    def reset(self) -> None:
        self.tail = {}

    def observe(self, ctx: LayerContext) -> None:
        i, n = ctx.layer_idx, ctx.query.shape[1]
        L = max(ctx.layer.head_lengths)
        if ctx.is_last_chunk or n >= self.size:
            if not ctx.is_last_chunk:
                self.tail[i] = (ctx.query[:, -self.size:].clone(), L)
            return
        old = self.tail.get(i)
        if n == L or old is None or old[1] + n != L:  # a fresh prefill starts, or no chunk to continue
            q = ctx.query if n == L else None
        else:
            q = torch.cat([old[0], ctx.query], dim=1)[:, -self.size:]
        if q is None:
            self.tail.pop(i, None)
        else:
            self.tail[i] = (q.clone(), L)

    def extend(self, ctx: LayerContext) -> LayerContext:
        old = self.tail.pop(ctx.layer_idx, None)
        n = ctx.query.shape[1]
        if n >= self.size or old is None or old[1] + n != max(ctx.layer.head_lengths):
            return ctx
        q = torch.cat([old[0][:, -(self.size - n):].to(ctx.query.dtype), ctx.query], dim=1)
        return dataclasses.replace(ctx, query=q)


class WindowQueries:
    """Mixin: a method with an observation window of `window_knob` queries keeps them across prefill chunks
    (see QueryTail). Its hooks: `observe_prefill` feeds the tail, `compress_layer` runs on the extended
    context; a class with its own hooks calls `self.window_tail().observe(ctx)` / `.extend(ctx)` itself."""
    window_knob = "window_size"

    def window_tail(self) -> QueryTail:
        size = int(getattr(self, self.window_knob))
        tail = self.__dict__.get("_query_tail")
        if tail is None or tail.size != size:
            tail = self.__dict__["_query_tail"] = QueryTail(size)
        return tail

    def reset(self) -> None:
        super().reset()
        self.window_tail().reset()

    def observe_prefill(self, ctx: LayerContext) -> None:
        super().observe_prefill(ctx)
        self.window_tail().observe(ctx)

    def compress_layer(self, ctx: LayerContext) -> None:
        super().compress_layer(self.window_tail().extend(ctx))


# On CUDA the fused Triton kernel scores the window without materialising (g, w, L) probabilities.
USE_KERNEL = "auto"  # "auto" (CUDA only) | "always" (tests: the kernel module's torch reference on CPU) | "never"


def _kernel_scores(ctx: LayerContext, w: int, kernel_size: int, pooling: str) -> torch.Tensor:
    from kvbench.methods.kernels import use_triton, window_scores_ref, window_scores_triton
    layer = ctx.layer
    q_win = ctx.query[:, -w:]
    if use_triton(q_win, layer.keys):
        # the cache's host copy of the lengths: no device sync inside the prefill
        flat = window_scores_triton(q_win, layer.keys, layer.starts, layer.lengths, ctx.scaling, kernel_size,
                                    pooling, host_lengths=layer.head_lengths)
    else:
        flat = window_scores_ref(q_win, layer.keys, layer.starts, layer.lengths, ctx.scaling, kernel_size, pooling)
    h, C, L = layer.n_heads, layer.keys.shape[0] // layer.n_heads, layer.head_lengths[0]
    scores = flat.view(h, C)[:, :L].clone()
    scores[:, L - w:] = float("inf")
    return scores


def snap_scores(ctx: LayerContext, window: int, kernel_size: int, pooling: str,
                budget: int | None = None) -> torch.Tensor:
    """(n_kv, L) scores; the window's own tokens get +inf (always kept). `budget`: the layer's kept tokens per
    head; a smaller budget shrinks the window to it (else more +inf tokens than slots, and the top-k's tie
    rule would keep the oldest of them and drop the last prompt token)."""
    keys = ctx.layer.dense()[0] if ctx.layer.is_uniform() else None
    if keys is None:
        raise ValueError("snapkv scores a freshly prefilled (uniform) layer")
    L = keys.shape[1]
    w = min(window, L, ctx.query.shape[1], budget if budget is not None else L)
    use = USE_KERNEL == "always" or (USE_KERNEL == "auto" and keys.is_cuda)
    # the kernel pools as pool1d does (max, or avg with the zero padding counted), any kernel size
    if use and L > w:
        return _kernel_scores(ctx, w, kernel_size, pooling)
    probs = window_attention(ctx.query, keys, w, ctx.scaling)       # (h, g, w, L)
    votes = probs.mean(dim=(1, 2))                                  # (h, L)
    scores = votes.clone()
    scores[:, : L - w] = pool1d(votes[:, : L - w], kernel_size, pooling)
    scores[:, L - w:] = float("inf")
    return scores


@register_method("snapkv")
@dataclass
class SnapKV(WindowQueries, ScoredEviction):
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (2404.14469)"
    family = "eviction: observation-window attention"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        budget = self.layer_budget(ctx.layer_idx, ctx.n_layers, max(ctx.layer.head_lengths))
        return snap_scores(ctx, self.window_size, self.kernel_size, self.pooling, budget)
