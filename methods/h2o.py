"""H2O — Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, 2306.14048).

Each token's score is the attention it has accumulated from every query so far (summed over the query heads
of its KV head). The cache keeps the `recent_ratio` share of the budget as the most recent tokens and fills
the rest with the highest-scoring older tokens ("heavy hitters"). Eviction continues during decoding: after
every step each head drops its lowest-scoring non-recent tokens, so it never holds more than the budget.
"""
from dataclasses import dataclass, field

import torch

from kvbench.method import LayerContext, Method, register_method


def accumulated_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float, chunk: int = 256) -> torch.Tensor:
    """Column sums of causal softmax attention. query (n_q, q, d) are the last q tokens of keys (h, L, d).
    Returns (h, L) in fp32; queries are processed `chunk` rows at a time (never the full L×L matrix)."""
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


@register_method("h2o")
@dataclass
class H2O(Method):
    recent_ratio: float = 0.5
    scores: dict = field(default_factory=dict, repr=False)  # layer -> list of per-head (L_h,) tensors

    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (2306.14048)"
    family = "eviction: accumulated attention, decode-time"
    needs_decode_probs = True

    def describe(self) -> dict:
        return {"budget": self.budget, "compression_ratio": self.compression_ratio, "recent_ratio": self.recent_ratio}

    def reset(self) -> None:
        self.scores = {}

    def observe_prefill(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        if not layer.is_uniform():
            raise ValueError("h2o observes prefill on a uniform cache")
        keys = layer.dense()[0]
        acc = accumulated_attention(ctx.query, keys, ctx.scaling)
        old = self.scores.get(ctx.layer_idx)
        if old is not None:  # earlier chunks: pad their scores with zeros for the new rows
            acc = acc + torch.stack([torch.nn.functional.pad(o, (0, acc.shape[1] - o.numel())) for o in old])
        self.scores[ctx.layer_idx] = list(acc.unbind(0))

    def _keep_count(self, n: int) -> tuple[int, int]:
        budget = self.target(n)
        recent = int(round(budget * self.recent_ratio))
        return budget, recent

    def compress_layer(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        n = max(layer.head_lengths)
        budget, recent = self._keep_count(n)
        if budget >= n:
            return
        acc = torch.stack(self.scores[ctx.layer_idx])                   # (h, L)
        pos = layer.dense()[2]
        is_recent = pos >= (pos.max(dim=1, keepdim=True).values - recent + 1)
        ranked = torch.where(is_recent, torch.full_like(acc, float("inf")), acc)
        idx = torch.sort(torch.topk(ranked, budget, dim=-1).indices, dim=-1).values
        layer.keep(idx)
        self.scores[ctx.layer_idx] = list(torch.gather(acc, 1, idx).unbind(0))

    def on_decode(self, ctx: LayerContext) -> None:
        layer = ctx.layer
        scores = self.scores.get(ctx.layer_idx)
        if scores is None:
            scores = [torch.zeros(0, device=layer.keys.device) for _ in range(layer.n_heads)]
        budget_cap = self.budget
        for h in range(layer.n_heads):
            p = ctx.probs[h].float()
            s = torch.nn.functional.pad(scores[h], (0, p.numel() - scores[h].numel())) + p
            n = p.numel()
            cap = budget_cap if budget_cap is not None else self._keep_count(n)[0]
            _, recent = self._keep_count(cap)
            while n > cap:
                pos = layer.head(h)[2]
                newest = int(pos.max())
                cand = torch.where(pos > newest - recent, torch.full_like(s, float("inf")), s)
                j = int(cand.argmin())
                layer.remove(h, j)
                s[j] = s[n - 1]
                s = s[: n - 1]
                n -= 1
            scores[h] = s
        self.scores[ctx.layer_idx] = scores
