"""CAKE — Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences" (ICLR 2025).

Layer budgets follow each layer's *preference* P = H^(1/tau1) · V^(1/tau2), measured on the observation
window's attention over the prefix: H (spatial dispersion) is the entropy of that attention and V (temporal
shift) its variance across the window's queries. Tokens are ranked by the eviction indicator
mean + gamma · variance of the window's attention (pooled, averaged over the query group); the window is kept.
Cascading: when layer m has been prefilled, the whole prefix budget n_layers · (budget − window) is split over
layers 0..m in proportion to their preferences, and the layers already compressed shrink to their new share
— memory never exceeds the total, and the final split is the one a full view of all layers would give.
While decoding each layer stays at its budget: every step drops the token (outside the last `window`
positions) with the lowest pooled attention from the new token, as the official code does.
`decode_eviction` declares that rule for the GPU decode path (kvbench/fast_decode.py), which evicts on the
device inside its CUDA graph: the layer budgets are fixed once the prefill's cascade ends (decoding never
changes them), so they are constants of the captured step.
Simplifications: average pooling ignores padding at the edges; rounding a layer's share never lets it
grow back past what it already holds (it was evicted), the remainder goes to the other layers.
"""
from dataclasses import dataclass, field

import torch

from kvbench.fast_decode import DecodeEviction
from kvbench.method import LayerContext, ScoredEviction, pool1d, register_method, topk_indices, window_attention
from kvbench.methods.snapkv import WindowQueries


def allocate(weights: list[float], total: int, caps: list[int]) -> list[int]:
    """Integers b_i <= caps[i] with sum min(total, sum(caps)), proportional to weights (water-filling:
    layers that would exceed their cap are capped and the rest is re-split); largest remainders round."""
    n = len(weights)
    total = min(int(total), sum(caps))
    w = [max(float(x), 0.0) for x in weights]
    if sum(w) <= 0:
        w = [1.0] * n
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        left = total - sum(fixed.values())
        wsum = sum(w[i] for i in free) or 1.0
        share = {i: left * w[i] / wsum for i in free}
        over = [i for i in free if share[i] > caps[i]]
        if not over:
            break
        for i in over:
            fixed[i] = float(caps[i])
    real = [fixed.get(i, share.get(i, 0.0)) for i in range(n)]
    out = [min(caps[i], int(real[i])) for i in range(n)]
    rest = total - sum(out)
    order = sorted(range(n), key=lambda i: (-(real[i] - int(real[i])), i))
    while rest > 0:
        moved = False
        for i in order:
            if rest > 0 and out[i] < caps[i]:
                out[i] += 1
                rest -= 1
                moved = True
        if not moved:
            break
    return out


def cake_layer_stats(query: torch.Tensor, keys: torch.Tensor, window: int, scaling: float, tau1: float,
                     tau2: float, gamma: float, kernel_size: int) -> tuple[float, torch.Tensor]:
    """Preference score of one layer and its eviction indicator over the prefix, (n_kv, L - window)."""
    L = keys.shape[1]
    probs = window_attention(query, keys, window, scaling)            # (h, g, w, L)
    pre = probs[..., : L - window]
    disp = -(pre * torch.log(pre + 1e-10)).sum()
    var = pre.var(dim=2).sum()
    pref = float(disp.clamp_min(0) ** (1.0 / tau1) * var.clamp_min(0) ** (1.0 / tau2))
    ind = probs.mean(dim=2) + gamma * probs.var(dim=2)                # (h, g, L)
    ind = pool1d(ind[..., : L - window].flatten(0, 1), kernel_size, "avg").view(ind.shape[0], ind.shape[1], -1)
    return pref, ind.mean(dim=1)


@register_method("cake")
@dataclass
class CAKE(WindowQueries, ScoredEviction):
    window_size: int = 32
    kernel_size: int = 5
    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 200.0
    evict_during_decode: bool = True
    state: dict = field(default_factory=dict, repr=False)

    paper = "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences (ICLR 2025)"
    family = "allocation: cascading layer budgets from attention dispersion/shift"
    needs_decode_probs = True

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in ("budget", "compression_ratio", "window_size", "kernel_size", "tau1",
                                               "tau2", "gamma", "evict_during_decode")}

    def reset(self) -> None:
        super().reset()
        self.state = {}

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """The eviction indicator alone (window = +inf), so other allocators (adakv) can reuse it."""
        keys = ctx.layer.dense()[0]
        L = keys.shape[1]
        w = min(self.window_size, L, ctx.query.shape[1])
        _, ind = cake_layer_stats(ctx.query, keys, w, ctx.scaling, self.tau1, self.tau2, self.gamma, self.kernel_size)
        return torch.cat([ind, torch.full((ind.shape[0], w), float("inf"), device=ind.device)], dim=1)

    def compress_layer(self, ctx: LayerContext) -> None:
        ctx = self.window_tail().extend(ctx)  # the window's queries across prefill chunks
        layer = ctx.layer
        if not layer.is_uniform():
            raise ValueError("cake compresses a freshly prefilled (uniform) layer")
        keys = layer.dense()[0]
        L = keys.shape[1]
        avg = self.target(L)
        if avg >= L:
            return
        w = min(self.window_size, avg, ctx.query.shape[1])
        pref, ind = cake_layer_stats(ctx.query, keys, w, ctx.scaling, self.tau1, self.tau2, self.gamma, self.kernel_size)
        st = self.state
        if ctx.layer_idx == 0 or "layers" not in st:
            st.update(layers={}, total=ctx.n_layers * (avg - w), budgets={})
        # layer -> [LayerKV, preference, indicator of its kept prefix rows, window]
        st["layers"][ctx.layer_idx] = [layer, pref, ind, w]
        ids = sorted(st["layers"])
        caps = [st["layers"][i][2].shape[1] for i in ids]  # a layer can only shrink
        shares = allocate([st["layers"][i][1] for i in ids], st["total"], caps)
        for i, b in zip(ids, shares):
            lay, _, sc, wi = st["layers"][i]
            st["budgets"][i] = b + wi
            n_pre = sc.shape[1]
            if b >= n_pre:
                continue
            idx = topk_indices(sc, b)                                             # (h, b) sorted
            win = torch.arange(n_pre, n_pre + wi, device=idx.device).expand(idx.shape[0], wi)
            lay.keep(torch.cat([idx, win], dim=1))  # kept rows stay in position order: prefix, then window
            st["layers"][i][2] = torch.gather(sc, 1, idx)

    def decode_eviction(self, cache) -> DecodeEviction:
        """`on_decode` for the device: each head over its layer's budget drops the row with the lowest
        attention from the new token, average-pooled over the head's rows in position order, outside the
        layer's last `window` positions."""
        n = len(cache.kv)
        budgets = self.state.get("budgets", {}) if self.evict_during_decode else {}
        caps = tuple(budgets.get(i) for i in range(n))
        recent = tuple(0 if c is None else self.state["layers"][i][3] for i, c in enumerate(caps))
        return DecodeEviction(caps=caps, rank="attention", recent=recent, pool=self.kernel_size)

    def on_decode(self, ctx: LayerContext) -> None:
        if not self.evict_during_decode or "budgets" not in self.state:
            return
        cap = self.state["budgets"].get(ctx.layer_idx)
        if cap is None:
            return
        w = self.state["layers"][ctx.layer_idx][3]
        layer = ctx.layer
        for h in range(layer.n_heads):
            if layer.head_lengths[h] <= cap:
                continue
            pos = layer.head(h)[2]
            order = torch.argsort(pos)
            pooled = torch.empty_like(ctx.probs[h])
            pooled[order] = pool1d(ctx.probs[h][order].unsqueeze(0), self.kernel_size, "avg")[0]
            pooled = pooled.masked_fill(pos > pos.max() - w, float("inf"))        # the recent window stays
            while layer.head_lengths[h] > cap:
                j = int(pooled.argmin())
                layer.remove(h, j)
                pooled[j] = pooled[-1]
                pooled = pooled[:-1]
