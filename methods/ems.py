"""EMS — Li et al., "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
Global-Local Importance" (2412.08521).

Global-local score: a token matters if it was important over the whole prompt (accumulated attention of every
prompt query, divided by how many queries could see it, so early tokens are not favoured) *or* to the most
recent queries (the observation window's attention). Both are normalised per head to sum to one and the
score is their maximum. Each KV head then works on its own (head-wise):
evict-then-merge — of the tokens that do not fit the budget, the lowest-scoring are evicted and the best
`merge_ratio` of them are merged into the kept token whose key is most similar (cosine), weighted by their
scores, so their information survives in fewer slots. Every head keeps exactly `budget` rows.
Simplification: the paper's zero-class mechanism (one batched kernel for merge and evict) is an efficiency
device; we loop per head. The observation window is always kept.
Chunked prefill (`prefill_chunk>0`): the global score accumulates the attention of every prompt query over
all chunks (each token divided by the number of prompt queries that see it), as an unchunked prefill does.
"""
from dataclasses import dataclass

import torch

from kvbench.method import LayerContext, Method, register_method, topk_indices, window_attention
from kvbench.methods.h2o import PrefillAttention, accumulated_attention
from kvbench.methods.snapkv import WindowQueries


def global_local_scores(query: torch.Tensor, keys: torch.Tensor, window: int, scaling: float,
                        acc: torch.Tensor | None = None, n_queries: int | None = None) -> torch.Tensor:
    """(n_kv, L) max of the normalised global (mean accumulated attention) and local (window) scores.
    acc/n_queries: the attention accumulated over the whole (chunked) prefill and its number of queries
    (default: computed from `query`, the last tokens of `keys`)."""
    L = keys.shape[1]
    if acc is None:
        acc, n_queries = accumulated_attention(query, keys, scaling), query.shape[1]  # (h, L) over queries, group
    seen = (L - torch.arange(L, device=keys.device)).clamp(max=n_queries).float()  # queries that see token j
    glob = acc / seen
    loc = window_attention(query, keys, window, scaling).sum(dim=(1, 2))
    glob = glob / glob.sum(-1, keepdim=True)
    loc = loc / loc.sum(-1, keepdim=True)
    s = torch.maximum(glob, loc)
    s[:, L - window:] = float("inf")
    return s


def merge_into_kept(k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, merged: torch.Tensor,
                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge rows `merged` of one head into their most key-similar `kept` row: each kept row becomes the
    weight-averaged mix of itself and the rows merged into it. Returns new (k, v) for the kept rows."""
    kk, vv = k[kept].float(), v[kept].float()
    if merged.numel() == 0:
        return kk.to(k.dtype), vv.to(v.dtype)
    sim = torch.nn.functional.normalize(k[merged].float(), dim=-1) @ torch.nn.functional.normalize(kk, dim=-1).T
    target = sim.argmax(dim=1)
    wk = weight[kept].float().clone()
    num_k, num_v = kk * wk[:, None], vv * wk[:, None]
    wm = weight[merged].float()
    num_k.index_add_(0, target, k[merged].float() * wm[:, None])
    num_v.index_add_(0, target, v[merged].float() * wm[:, None])
    wk.index_add_(0, target, wm)
    return (num_k / wk[:, None]).to(k.dtype), (num_v / wk[:, None]).to(v.dtype)


@register_method("ems")
@dataclass
class EMS(WindowQueries, Method):
    window_size: int = 32
    merge_ratio: float = 0.5

    paper = "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression (2412.08521)"
    family = "eviction + merging: global-local scores, head-wise"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= float(self.merge_ratio) <= 1.0:
            raise ValueError(f"method.merge_ratio={self.merge_ratio!r}; allowed: 0 <= ratio <= 1")
        self._prefill = PrefillAttention()  # per-sample state, not a knob

    def reset(self) -> None:
        super().reset()
        self._prefill.reset()

    def observe_prefill(self, ctx: LayerContext) -> None:
        super().observe_prefill(ctx)
        self._prefill.observe(ctx)

    def compress_layer(self, ctx: LayerContext) -> None:
        ctx = self.window_tail().extend(ctx)  # the window's queries across prefill chunks
        layer = ctx.layer
        if not layer.is_uniform():
            raise ValueError("ems compresses a freshly prefilled (uniform) layer")
        keys, values, _ = layer.dense()
        L = keys.shape[1]
        b = self.target(L)
        acc, n_queries = self._prefill.take(ctx)
        if b >= L:
            return
        w = min(self.window_size, b, ctx.query.shape[1])
        scores = global_local_scores(ctx.query, keys, w, ctx.scaling, acc, n_queries)
        kept = topk_indices(scores, b)                                     # (h, b)
        new_k, new_v = keys[:, :b].clone(), values[:, :b].clone()
        for h in range(layer.n_heads):
            s = scores[h].clone()
            s[kept[h]] = float("-inf")
            n_merge = int(round((L - b) * float(self.merge_ratio)))
            merged = topk_indices(s, n_merge) if n_merge else kept.new_zeros(0)
            weight = scores[h].clamp(max=1.0)  # window (+inf) rows weigh as much as a full unit of attention
            new_k[h], new_v[h] = merge_into_kept(keys[h], values[h], kept[h], merged, weight)
        layer.keep(kept)
        k2, v2, _ = layer.dense()
        k2.copy_(new_k)
        v2.copy_(new_v)
