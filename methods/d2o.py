"""D2O — Wan et al., "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of Large
Language Models" (2406.13035).

Two levels. Layer level: layers whose attention is *dense* (spread over many tokens) need more cache, so the
total budget (budget × n_layers) is split in proportion to each layer's attention density, measured on the
last `window_size` prompt queries as the effective number of attended tokens (exp of the entropy) divided by
the number of visible tokens. Token level: H2O's rule (accumulated attention, `recent_ratio` of the budget
for the most recent tokens) picks what is kept, but an evicted token is not simply lost: it is merged into
the kept token with the most similar key (cosine) when that similarity reaches a threshold kept as an
exponential moving average (`ema_beta`) of the similarities seen. Merging mixes keys and values with
weights exp(u_e) / (Σ exp(u) + e) for the merged tokens and e / (Σ exp(u) + e) for the kept one.
Eviction (with merging) continues while decoding, so each layer stays within its budget.
`decode_eviction` declares the decode-time rule for the GPU decode path (kvbench/fast_decode.py), which evicts
and merges on the device inside its CUDA graph: the victim's most similar row is found among the head's
fixed-size rows, the merge is a masked write of one row, and each head's EMA threshold is a device scalar.
Simplification: the paper's density statistic and EMA constants are not restated here; we use the entropy-
based density above and initialise each head's threshold to the mean similarity of its first evictions.
All layers must be scored before the split, so compression happens in `after_prefill` (the prefill peak
holds the full cache). Chunked prefill (`prefill_chunk>0`): the accumulated attention sums every prompt
query over all chunks, as an unchunked prefill does.
"""
import math
from dataclasses import dataclass, field

import torch

from kvbench.fast_decode import DecodeEviction
from kvbench.method import LayerContext, Method, register_method, topk_indices, window_attention
from kvbench.methods.cake import allocate
from kvbench.methods.h2o import PrefillAttention
from kvbench.methods.snapkv import WindowQueries


def attention_density(query: torch.Tensor, keys: torch.Tensor, window: int, scaling: float) -> float:
    """Mean over the window's queries and all heads of exp(entropy) / visible tokens, in (0, 1]."""
    L = keys.shape[1]
    p = window_attention(query, keys, window, scaling)                       # (h, g, w, L)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)                      # (h, g, w)
    visible = torch.arange(L - window + 1, L + 1, device=keys.device, dtype=p.dtype)
    return float((ent.exp() / visible).mean())


def nearest_kept(k: torch.Tensor, evicted: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each evicted row: (index into `kept` of its most similar key, that cosine similarity)."""
    a = torch.nn.functional.normalize(k[evicted].float(), dim=-1)
    b = torch.nn.functional.normalize(k[kept].float(), dim=-1)
    sim = a @ b.T
    best = sim.max(dim=1)
    return best.indices, best.values


def d2o_merge(k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor, target: torch.Tensor,
              sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """New (k, v) of the kept rows after merging `evicted[i]` into `kept[target[i]]` with D2O's weights."""
    kk, vv = k[kept].float(), v[kept].float()
    if evicted.numel() == 0:
        return kk, vv
    den = torch.full((kept.numel(),), math.e, device=k.device)
    den.index_add_(0, target, sim.exp())
    num_k = kk * math.e
    num_v = vv * math.e
    num_k.index_add_(0, target, k[evicted].float() * sim.exp()[:, None])
    num_v.index_add_(0, target, v[evicted].float() * sim.exp()[:, None])
    hit = torch.zeros(kept.numel(), dtype=torch.bool, device=k.device)
    hit[target] = True  # rows nothing merged into stay bit-identical
    return (torch.where(hit[:, None], num_k / den[:, None], kk), torch.where(hit[:, None], num_v / den[:, None], vv))


SCORE = "d2o_score"  # each row's accumulated attention, kept beside it in the cache (LayerKV side data)


@register_method("d2o")
@dataclass
class D2O(WindowQueries, Method):
    recent_ratio: float = 0.5
    window_size: int = 32
    ema_beta: float = 0.7
    pending: dict = field(default_factory=dict, repr=False)   # layer -> (LayerKV, acc scores, density)
    caps: dict = field(default_factory=dict, repr=False)      # layer -> tokens per head
    tau: dict = field(default_factory=dict, repr=False)       # (layer, head) -> EMA similarity threshold

    paper = "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference (2406.13035)"
    family = "eviction + merging: density layer budgets, EMA-threshold merge, decode-time"
    needs_decode_probs = True

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("budget", "compression_ratio", "recent_ratio", "window_size", "ema_beta")}

    def __post_init__(self):
        super().__post_init__()
        self._prefill = PrefillAttention()  # per-sample state, not a knob

    def reset(self) -> None:
        super().reset()
        self.pending, self.caps, self.tau = {}, {}, {}
        self._prefill.reset()

    def observe_prefill(self, ctx: LayerContext) -> None:
        super().observe_prefill(ctx)
        self._prefill.observe(ctx)

    def compress_layer(self, ctx: LayerContext) -> None:
        ctx = self.window_tail().extend(ctx)  # the window's queries across prefill chunks
        layer = ctx.layer
        if not layer.is_uniform():
            raise ValueError("d2o compresses a freshly prefilled (uniform) layer")
        keys = layer.dense()[0]
        L = keys.shape[1]
        w = min(self.window_size, L, ctx.query.shape[1])
        acc = self._prefill.take(ctx)[0]
        self.pending[ctx.layer_idx] = (layer, acc, attention_density(ctx.query, keys, w, ctx.scaling))

    def layer_budgets(self, densities: list[float], avg: int, L: int) -> list[int]:
        return allocate(densities, avg * len(densities), [L] * len(densities))

    def _merge_step(self, key, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor):
        """Merge the evicted rows whose best similarity reaches the head's EMA threshold; update the EMA."""
        target, sim = nearest_kept(k, evicted, kept)
        tau = self.tau.get(key)
        if tau is None:
            tau = float(sim.mean())
        ok = sim >= tau
        new_k, new_v = d2o_merge(k, v, kept, evicted[ok], target[ok], sim[ok])
        self.tau[key] = self.ema_beta * float(sim.mean()) + (1 - self.ema_beta) * tau
        return new_k, new_v

    def after_prefill(self, cache) -> None:
        if not self.pending:
            return
        ids = sorted(self.pending)
        L = self.pending[ids[0]][0].head_lengths[0]
        avg = self.target(L)
        budgets = self.layer_budgets([self.pending[i][2] for i in ids], avg, L)
        for i, b in zip(ids, budgets):
            layer, acc, _ = self.pending[i]
            self.caps[i] = b
            layer.set_side(SCORE, acc)  # each row's accumulated attention stays beside it (keep, remove)
            if b >= L:
                continue
            recent = min(b, int(round(b * self.recent_ratio)))
            ranked = acc.clone()
            ranked[:, L - recent:] = float("inf")
            kept = topk_indices(ranked, b)
            keys, values, _ = layer.dense()
            new = []
            for h in range(layer.n_heads):
                mask = torch.ones(L, dtype=torch.bool, device=keys.device)
                mask[kept[h]] = False
                new.append(self._merge_step((i, h), keys[h], values[h], kept[h], mask.nonzero().flatten()))
            layer.keep(kept)
            k2, v2, _ = layer.dense()
            for h, (nk, nv) in enumerate(new):
                k2[h].copy_(nk)
                v2[h].copy_(nv)
        self.pending = {}

    def decode_eviction(self, cache) -> DecodeEviction | None:
        """`on_decode` for the device: every step's attention adds to the scores, each head over its layer's
        budget merges its lowest-scoring row outside the recent window into its most similar row (when the
        similarity reaches the head's threshold), then drops it. None (the engine loop) when a layer has no
        budget (no compression ran): on_decode neither scores nor evicts there."""
        caps = tuple(self.caps.get(i) for i in range(len(cache.kv)))
        if any(c is None for c in caps):
            return None
        recent = tuple(min(c, int(round(c * self.recent_ratio))) for c in caps)
        taus = tuple(tuple(self.tau.get((i, h)) for h in range(layer.n_heads)) for i, layer in enumerate(cache.kv))
        return DecodeEviction(caps=caps, rank="score", score=SCORE, recent=recent, merge_tau=taus,
                              merge_beta=self.ema_beta, store_tau=self._store_tau)

    def _store_tau(self, layer_idx: int, taus: list) -> None:
        for h, t in enumerate(taus):
            if t is not None:
                self.tau[(layer_idx, h)] = t

    def on_decode(self, ctx: LayerContext) -> None:
        cap = self.caps.get(ctx.layer_idx)
        if cap is None:
            return
        layer = ctx.layer
        layer.add_side(SCORE, [p.float() for p in ctx.probs])  # the new row's score starts at its attention
        recent = min(cap, int(round(cap * self.recent_ratio)))
        for h in range(layer.n_heads):
            while layer.head_lengths[h] > cap:
                k, v, pos = layer.head(h)
                s = layer.side_head(SCORE, h)
                cand = s.masked_fill(pos > pos.max() - recent, float("inf"))
                j = int(cand.argmin())
                rest = torch.tensor([r for r in range(s.numel()) if r != j], device=k.device)
                nk, nv = self._merge_step((ctx.layer_idx, h), k, v, rest, torch.tensor([j], device=k.device))
                k[rest] = nk.to(k.dtype)  # a head's rows are views into the layer's storage; only a target changes
                v[rest] = nv.to(v.dtype)
                layer.remove(h, j)  # its score leaves with it (side data)
