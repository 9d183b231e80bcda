"""CORM — Dai et al., "CORM: Cache Optimization with Recent Message for Large Language Model Inference"
(2404.15949).

Adjacent queries are similar, so the keys that the *recent* queries found important are the ones the next
queries will need. A key j is important when some query i of the last `window_size` tokens (any query head of
its KV group) gives it more attention than a uniform spread would: a_ij >= alpha / t_i, t_i being the number of
keys query i sees. Its score is max_i a_ij · t_i; the recent window itself is always kept.
With a `budget` (or compression_ratio) each head keeps its top-`budget` scores; with neither, each head keeps
exactly its important keys — the paper's budget-free mode, where heads end up with different lengths.
Simplification: the paper re-applies the rule at every decoding step with the newest queries; we apply it
once, at the end of prefill.
"""
from dataclasses import dataclass

import torch

from kvbench.method import LayerContext, Method, register_method, topk_indices, window_attention
from kvbench.methods.snapkv import WindowQueries


def corm_scores(query: torch.Tensor, keys: torch.Tensor, window: int, scaling: float) -> torch.Tensor:
    """(n_kv, L): max over the window's queries (and the query group) of attention × number of visible keys;
    the window's own tokens get +inf."""
    L = keys.shape[1]
    probs = window_attention(query, keys, window, scaling)                 # (h, g, w, L)
    visible = torch.arange(L - window + 1, L + 1, device=keys.device, dtype=probs.dtype).view(1, 1, window, 1)
    rel = (probs * visible).amax(dim=(1, 2))
    rel[:, L - window:] = float("inf")
    return rel


@register_method("corm")
@dataclass
class CORM(WindowQueries, Method):
    window_size: int = 32
    alpha: float = 1.0

    paper = "CORM: Cache Optimization with Recent Message for LLM Inference (2404.15949)"
    family = "eviction: recent-query attention threshold"

    def compress_layer(self, ctx: LayerContext) -> None:
        ctx = self.window_tail().extend(ctx)  # the window's queries across prefill chunks
        layer = ctx.layer
        if not layer.is_uniform():
            raise ValueError("corm compresses a freshly prefilled (uniform) layer")
        L = layer.head_lengths[0]
        w = min(self.window_size, L, ctx.query.shape[1])
        if self.budget is None and self.compression_ratio is None:
            rel = corm_scores(ctx.query, layer.dense()[0], w, ctx.scaling)
            layer.keep([torch.nonzero(r >= self.alpha).flatten() for r in rel])
            return
        b = self.target(L)
        if b >= L:
            return
        layer.keep(topk_indices(corm_scores(ctx.query, layer.dense()[0], w, ctx.scaling), b))
