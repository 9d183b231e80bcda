"""CompressKV — Lin et al., "CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before
Generation" (2508.02401).

Tokens are scored only by each layer's *semantic retrieval heads* (the `first_k` query heads that best retrieve
context): their attention from the observation window (last `window_size` tokens), summed over the window,
pooled, averaged over those heads; every KV head of the layer keeps the same top tokens plus the window.
Layer budgets are error-aware: each layer's importance is the eviction error of its attention output
(Frobenius norm of full minus compressed output on the window's queries at the uniform budget), normalised
over layers; a layer gets min_tokens + importance × (rest), capped at max_factor × budget.
Closest faithful version: the paper finds retrieval heads offline (needle-in-a-haystack copy-and-paraphrase
scoring) and averages layer errors over a calibration set. `retrieval_heads` / `layer_scores` accept such
profiles; without them we use online proxies from this very prompt — the heads putting the most window
attention on the prefix beyond the first `n_sink` tokens, and the layer errors measured now. Without
`layer_scores` the layers are compressed in `after_prefill` (all errors are needed first), so the prefill
peak holds the full cache.
"""
from dataclasses import dataclass, field

import torch

from kvbench.method import LayerContext, ScoredEviction, pool1d, register_method, topk_indices, window_attention
from kvbench.methods.snapkv import WindowQueries

from kvbench.methods.cake import allocate


def retrieval_head_scores(probs: torch.Tensor, n_prefix: int, n_sink: int) -> torch.Tensor:
    """(n_q,) attention mass each query head's window puts on the prefix beyond the sinks (proxy profile)."""
    h, g = probs.shape[:2]
    return probs[..., n_sink:n_prefix].sum(dim=(-1, -2)).reshape(h * g)


@register_method("compresskv")
@dataclass
class CompressKV(WindowQueries, ScoredEviction):
    window_size: int = 8
    kernel_size: int = 5
    pooling: str = "avg"
    first_k: int = 4
    n_sink: int = 4
    min_tokens: int = 32
    max_factor: float = 3.0
    retrieval_heads: list | None = None   # per layer: query-head ids, best first (offline profile)
    layer_scores: list | None = None      # per layer: normalised eviction error (offline profile)
    pending: dict = field(default_factory=dict, repr=False)

    paper = "CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before Generation (2508.02401)"
    family = "eviction: retrieval-head scoring + error-aware layer budgets"

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("budget", "compression_ratio", "window_size", "kernel_size", "pooling",
                                               "first_k", "n_sink", "min_tokens", "max_factor", "retrieval_heads",
                                               "layer_scores")}

    def reset(self) -> None:
        super().reset()
        self.pending = {}

    def heads(self, ctx: LayerContext, probs: torch.Tensor, n_prefix: int) -> list[int]:
        n_q = probs.shape[0] * probs.shape[1]
        k = min(self.first_k, n_q)
        if self.retrieval_heads is not None:
            return [int(x) for x in self.retrieval_heads[ctx.layer_idx][:k]]
        s = retrieval_head_scores(probs, n_prefix, self.n_sink)
        return sorted(torch.topk(s, k).indices.tolist())

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """(n_kv, L): the retrieval heads' pooled window attention, shared by all KV heads; window = +inf."""
        keys = ctx.layer.dense()[0]
        L = keys.shape[1]
        w = min(self.window_size, L, ctx.query.shape[1])
        probs = window_attention(ctx.query, keys, w, ctx.scaling)            # (h, g, w, L)
        sel = self.heads(ctx, probs, L - w)
        votes = probs.flatten(0, 1)[sel].sum(dim=1)[:, : L - w]              # (k, L - w)
        s = pool1d(votes, self.kernel_size, self.pooling).mean(dim=0)
        s = torch.cat([s, torch.full((w,), float("inf"), device=s.device)])
        return s.expand(ctx.n_kv, L)

    def layer_budgets(self, scores: list[float], avg: int, n_layers: int, n_tokens: int) -> list[int]:
        lo = min(self.min_tokens, avg)
        hi = max(lo, min(n_tokens, int(self.max_factor * avg)))
        extra = allocate(scores, n_layers * (avg - lo), [hi - lo] * n_layers)
        return [lo + e for e in extra]

    def compress_layer(self, ctx: LayerContext) -> None:
        ctx = self.window_tail().extend(ctx)  # the window's queries across prefill chunks
        layer = ctx.layer
        if not layer.is_uniform():
            raise ValueError("compresskv compresses a freshly prefilled (uniform) layer")
        L = layer.head_lengths[0]
        avg = self.target(L)
        if avg >= L:
            return
        scores = self.score(ctx)
        if self.layer_scores is not None:
            b = self.layer_budgets(list(self.layer_scores), avg, ctx.n_layers, L)[ctx.layer_idx]
            if b < L:
                layer.keep(topk_indices(scores, b))
            return
        keys, values, _ = layer.dense()
        idx = topk_indices(scores[0], avg)
        w = min(self.window_size, L, ctx.query.shape[1])
        probs = window_attention(ctx.query, keys, w, ctx.scaling)            # (h, g, w, L)
        full = probs @ values.float().unsqueeze(1)
        mask = torch.zeros(L, dtype=torch.bool, device=keys.device)
        mask[idx] = True
        p2 = probs * mask
        part = (p2 / p2.sum(-1, keepdim=True)) @ values.float().unsqueeze(1)
        err = float((full - part).norm())
        self.pending[ctx.layer_idx] = (layer, scores, err, avg, L)

    def after_prefill(self, cache) -> None:
        if not self.pending:
            return
        ids = sorted(self.pending)
        n_layers = len(cache)
        errs = [self.pending[i][2] for i in ids]
        tot = sum(errs) or 1.0
        avg, L = self.pending[ids[0]][3], self.pending[ids[0]][4]
        budgets = self.layer_budgets([e / tot for e in errs], avg, n_layers, L)
        for i, b in zip(ids, budgets):
            layer, scores = self.pending[i][0], self.pending[i][1]
            if b < layer.head_lengths[0]:
                layer.keep(topk_indices(scores, b))
        self.pending = {}
