"""H2O — Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, 2306.14048).

Each token's score is the attention it has accumulated from every query so far (summed over the query heads
of its KV head). The cache keeps the `recent_ratio` share of the budget as the most recent tokens and fills
the rest with the highest-scoring older tokens ("heavy hitters"). Eviction continues during decoding: after
every step each head drops its lowest-scoring non-recent tokens, so it never holds more than the budget.
With `compression_ratio` the per-head cap is fixed once, at compression time (round(n·(1 − ratio)) of the
n-token prompt, as TOVA does), and decoding keeps that many tokens: the cache does not shrink further.
`decode_eviction` declares the same decode-time rule for the GPU decode path (kvbench/fast_decode.py), which
evicts on the device inside its CUDA graph.
"""
from dataclasses import dataclass, field

import torch

from kvbench.fast_decode import DecodeEviction
from kvbench.method import LayerContext, Method, register_method


def accumulated_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float, chunk: int = 256) -> torch.Tensor:
    """Column sums of causal softmax attention. query (n_q, q, d) are the last q tokens of keys (h, L, d).
    Returns (h, L) in fp32; queries are processed `chunk` rows at a time (never the full L×L matrix).
    On CUDA: the Triton kernel of methods/kernels/colsum.py (same sums, two passes over key tiles, no L×L
    scores in memory; tested against this loop's twin, `attention_colsum_ref`): the torch loop launches a few
    kernels per 256 queries per layer, which made H2O's 8K prefill 7x the full cache's on an H100."""
    from kvbench.methods.kernels import attention_colsum_triton, use_triton
    if use_triton(query, keys):
        return attention_colsum_triton(query, keys, scaling)
    n_q, q_len, d = query.shape
    h, L, _ = keys.shape
    g = n_q // h
    kf = keys.float()
    acc = torch.zeros(h, L, device=keys.device)
    kpos = torch.arange(L, device=keys.device)
    for s in range(0, q_len, chunk):
        e = min(q_len, s + chunk)
        q = query[:, s:e].float().reshape(h, g * (e - s), d)
        logits = (q @ kf.transpose(1, 2)) * scaling                     # (h, g*c, L)
        qpos = (torch.arange(s, e, device=keys.device) + L - q_len).repeat(g)
        logits = logits.masked_fill(kpos.view(1, 1, L) > qpos.view(1, -1, 1), float("-inf"))
        acc += torch.softmax(logits, dim=-1).sum(dim=1)
    return acc


class PrefillAttention:
    """Per layer, the attention accumulated from every query of the prefill being compressed, over all its
    chunks (`prefill_chunk>0`), and how many queries that is. Feed it from `observe_prefill` (every chunk),
    read it in `compress_layer` (the last chunk). A chunk is added when it continues what is stored (the
    stored columns plus its queries are the layer's length); a chunk whose queries are the whole layer starts
    afresh. Anything else (a compression on top of a cache that already held tokens) is not stored, and
    `take` falls back to the queries of the current forward alone."""

    def __init__(self):
        self.acc: dict[int, torch.Tensor] = {}
        self.n_queries: dict[int, int] = {}

    def reset(self) -> None:
        self.acc, self.n_queries = {}, {}

    def observe(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        i = ctx.layer_idx
        if not layer.is_uniform():
            self.acc.pop(i, None)
            return
        L, q = layer.head_lengths[0], ctx.query.shape[1]
        old = self.acc.get(i)
        if q == L or old is None or old.shape[1] + q != L:
            old = None
            self.n_queries[i] = 0
            if q != L:
                self.acc.pop(i, None)
                return
        acc = accumulated_attention(ctx.query, layer.dense()[0], ctx.scaling)
        if old is not None:
            acc[:, : old.shape[1]] += old
        self.acc[i] = acc
        self.n_queries[i] += q

    def take(self, ctx: LayerContext) -> tuple[torch.Tensor, int]:
        """(h, L) accumulated attention and the number of queries it sums, for this layer (then forgotten)."""
        i, L = ctx.layer_idx, ctx.layer.head_lengths[0]
        acc, n = self.acc.pop(i, None), self.n_queries.pop(i, 0)
        if acc is None or acc.shape[1] != L:
            acc, n = accumulated_attention(ctx.query, ctx.layer.dense()[0], ctx.scaling), ctx.query.shape[1]
        return acc, n


SCORE = "h2o_score"  # the accumulated attention of each row, kept beside it in the cache (LayerKV side data)


@register_method("h2o")
@dataclass
class H2O(Method):
    recent_ratio: float = 0.5
    caps: dict = field(default_factory=dict, repr=False)    # layer -> tokens per head fixed at compression

    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (2306.14048)"
    family = "eviction: accumulated attention, decode-time"
    needs_decode_probs = True

    def describe(self) -> dict:
        return {"budget": self.budget, "compression_ratio": self.compression_ratio, "recent_ratio": self.recent_ratio}

    def reset(self) -> None:
        self.caps = {}

    def observe_prefill(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        if not layer.is_uniform():
            raise ValueError("h2o observes prefill on a uniform cache")
        keys = layer.dense()[0]
        # the scores live beside their rows (side data): rows fed since the last chunk start at 0
        layer.add_side(SCORE, accumulated_attention(ctx.query, keys, ctx.scaling))

    def _keep_count(self, n: int) -> tuple[int, int]:
        budget = self.target(n)
        recent = int(round(budget * self.recent_ratio))
        return budget, recent

    def compress_layer(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        n = max(layer.head_lengths)
        budget, recent = self._keep_count(n)
        self.caps[ctx.layer_idx] = budget  # the decode-time cap (ratio mode: of the prompt, not the live length)
        if budget >= n:
            return
        acc = layer.side_dense(SCORE)                                   # (h, L)
        pos = layer.dense()[2]
        is_recent = pos >= (pos.max(dim=1, keepdim=True).values - recent + 1)
        ranked = torch.where(is_recent, torch.full_like(acc, float("inf")), acc)
        idx = torch.sort(torch.topk(ranked, budget, dim=-1).indices, dim=-1).values
        layer.keep(idx)  # the kept rows keep their scores

    def _decode_cap(self, layer_idx: int, n_before: int) -> int | None:
        """The per-head cap while decoding (None: keep everything); n_before: the layer's longest head before
        the step. A ratio with no compression before (a context prefilled without it) fixes it once, here."""
        cap = self.budget if self.budget is not None else self.caps.get(layer_idx)
        if cap is None and self.compression_ratio is not None:
            cap = self.caps[layer_idx] = self._keep_count(n_before)[0]
        return cap

    def decode_eviction(self, cache) -> DecodeEviction:
        """`on_decode` for the device: every step's attention adds to the scores, then each head over its cap
        drops its lowest-scoring row outside the protected recent window."""
        caps = tuple(self._decode_cap(i, max(layer.head_lengths)) for i, layer in enumerate(cache.kv))
        recent = tuple(0 if c is None else int(round(c * self.recent_ratio)) for c in caps)
        return DecodeEviction(caps=caps, rank="score", score=SCORE, recent=recent)

    def on_decode(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        cap = self._decode_cap(ctx.layer_idx, max(layer.head_lengths) - 1)
        layer.add_side(SCORE, [p.float() for p in ctx.probs])  # the new row's score starts at its first attention
        if cap is None:  # no budget, no ratio: keep everything, only accumulate
            return
        recent = int(round(cap * self.recent_ratio))
        for h in range(layer.n_heads):
            while layer.head_lengths[h] > cap:
                pos = layer.head(h)[2]
                s = layer.side_head(SCORE, h)
                cand = torch.where(pos > int(pos.max()) - recent, torch.full_like(s, float("inf")), s)
                layer.remove(h, int(cand.argmin()))  # its score leaves with it (side data)
