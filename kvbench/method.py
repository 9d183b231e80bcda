"""The small interface between KV-cache methods and the engine.

A method sees one layer at a time through a `LayerContext` (post-RoPE queries of the current forward,
the layer's ragged cache) and changes the cache in place (`ctx.layer.keep(...)`, `ctx.layer.remove(...)`).
Most methods are a *scorer* (which tokens matter) × an *allocator* (how many tokens each layer/head keeps),
which `ScoredEviction` composes; methods that don't fit override the hooks directly.
Methods never import tasks.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import torch

from kvbench.cache import KVBenchCache, LayerKV


@dataclass
class LayerContext:
    layer_idx: int
    n_layers: int
    query: torch.Tensor          # (n_q, q_len, d) post-RoPE queries of this forward's tokens
    layer: LayerKV               # this layer's cache (the new tokens are already appended)
    scaling: float
    module: torch.nn.Module
    is_last_chunk: bool = True   # prefill: the last chunk of the part being compressed
    probs: list[torch.Tensor] | None = None  # decode: per KV head, attention of the new token (summed over its query group)

    @property
    def n_kv(self) -> int:
        return self.layer.n_heads

    @property
    def group(self) -> int:
        return self.query.shape[0] // self.layer.n_heads


@dataclass
class Method:
    """Base: keeps everything (the `full` cache)."""
    budget: int | None = None                 # kept KV tokens per head per layer, on average
    compression_ratio: float | None = None    # alternative to budget: fraction of tokens dropped

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    family: ClassVar[str] = ""
    needs_decode_probs: ClassVar[bool] = False
    uses_budget: ClassVar[bool] = True  # False: keeps every token (full, a storage format alone): no budget knob
    # how kept rows are stored and what attention reads (kvbench.store), set by build_method from the config's
    # method.storage / method.selector; None: plain rows, all read. Not dataclass fields: they are not per-sample
    # state and forks share them.
    storage = None
    selector = None

    def __post_init__(self):
        if self.budget is not None and (not isinstance(self.budget, int) or isinstance(self.budget, bool)
                                        or self.budget <= 0):
            raise ValueError(f"budget={self.budget!r}; allowed: a positive integer (kept tokens per head per layer)")
        if self.compression_ratio is not None and not 0.0 <= float(self.compression_ratio) < 1.0:
            raise ValueError(f"compression_ratio={self.compression_ratio!r}; allowed: 0 <= ratio < 1")

    # -- lifecycle hooks (called by the engine / attention function) ---------------------------------
    def reset(self) -> None:
        """Forget per-sample state before a new context."""

    def observe_prefill(self, ctx: LayerContext) -> None:
        """Every prefill chunk of the part to be compressed (accumulating scorers such as H2O)."""

    def compress_layer(self, ctx: LayerContext) -> None:
        """After the exact attention of the last prefill chunk: shrink `ctx.layer` in place."""

    def after_prefill(self, cache: KVBenchCache) -> None:
        """After all layers are prefilled (cross-layer allocation)."""

    def on_decode(self, ctx: LayerContext) -> None:
        """After each decode step's attention (decode-time eviction)."""

    def decode_ring(self) -> tuple[int, int] | None:
        """(n_sink, cap) when `on_decode` is exactly a rolling window: after a step's attention every head
        over `cap` rows drops its oldest token whose position is >= n_sink (StreamingLLM, recent). The
        CUDA-graph decode path then runs it as a ring buffer on the device. None: no such promise."""
        return None

    # -- storage formats (kvbench.store) ------------------------------------------------------------
    def formats(self) -> list:
        """The non-plain storage format and selector, in the order they encode a layer."""
        return [f for f in (self.storage, self.selector) if f is not None and not f.is_plain]

    @classmethod
    def touches_rows_after_prefill(cls) -> bool:
        """True when the method's hooks change or score the rows while decoding (decode-time eviction): such
        methods work on plain rows only. (What a method observes of tokens fed after compression — a question
        on top of an encoded context — is not given to it: it has nothing left to decide there.)"""
        return cls.needs_decode_probs or cls.on_decode is not Method.on_decode

    def encodes_per_layer(self) -> bool:
        """Encode each layer right after its compression (frees its plain rows at once), unless a format
        spans layers or the method still changes layers after the whole prefill (after_prefill)."""
        return (all(f.per_layer for f in self.formats())
                and type(self).after_prefill is Method.after_prefill)

    def keep_query_window(self, cache: KVBenchCache, layer_idx: int, query: torch.Tensor) -> None:
        """Formats that read the prefill's last queries (ThinK) get them at encoding time."""
        w = max((f.query_window for f in self.formats()), default=0)
        if w:
            cache.query_windows[layer_idx] = query[:, -w:].detach()

    def encode_layer(self, cache: KVBenchCache, layer_idx: int) -> None:
        for f in self.formats():
            cache.kv[layer_idx] = f.encode_counted(cache.kv[layer_idx], layer_idx, len(cache.kv),
                                                   cache.query_windows.get(layer_idx))
        cache.query_windows.pop(layer_idx, None)

    def encode_cache(self, cache: KVBenchCache) -> None:
        for f in self.formats():
            f.encode_cache(cache)
        cache.query_windows.clear()

    def fork(self) -> "Method":
        """A copy whose per-sample state can diverge (one query of a shared context)."""
        import copy
        return copy.deepcopy(self)

    # -- budgets -------------------------------------------------------------------------------------
    def target(self, n_tokens: int) -> int:
        """Average kept tokens per head per layer for a context of n_tokens (no compression ⇒ n_tokens)."""
        if self.budget is not None:
            return min(self.budget, n_tokens)
        if self.compression_ratio is not None:
            return max(1, min(n_tokens, int(round(n_tokens * (1.0 - self.compression_ratio)))))
        return n_tokens

    def describe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim, ties broken towards earlier tokens, sorted.
    Ties are frequent (max-pooling, +inf windows). On a GPU a Triton radix select, then the kept indices in
    order (methods/kernels/topk_select.py); elsewhere a stable descending sort, then a sort of the kept
    indices."""
    from kvbench.methods.kernels.topk_select import topk_select
    L = scores.shape[-1]
    k = min(k, L)
    if k == L:
        return torch.arange(L, device=scores.device).expand(scores.shape).contiguous()
    return topk_select(scores.reshape(-1, L), k, k).reshape(*scores.shape[:-1], k)


def ragged_topk_indices(scores: torch.Tensor, counts: list[int] | torch.Tensor,
                        total: int | None = None) -> torch.Tensor:
    """Head h's `counts[h]` largest scores of (n_kv, L) `scores`, as local indices sorted within each head,
    heads back to back: (sum(counts),). Same choice as `topk_indices` row by row, in a few batched ops
    whose output sizes are known on the host (no device sync). counts: host ints, or (a cut made on the
    device) the (3, n_kv) int64 device layout of `LayerKV.keep_ragged`, whose sum `total` the host knows."""
    from kvbench.cache import long_tensor
    from kvbench.methods.kernels.topk_select import topk_select
    h, L = scores.shape
    dev = scores.device
    if isinstance(counts, torch.Tensor):  # k per head on the device; no head keeps more than L or the total
        offset, cnt, kmax = counts[0], counts[1], min(L, total)
    else:
        counts = [min(c, L) for c in counts]
        kmax, total = max(counts, default=0), sum(counts)
        if total == 0:
            return torch.empty(0, dtype=torch.long, device=dev)
        cnt = long_tensor(counts, dev)
        offset = torch.cumsum(cnt, 0) - cnt
    order = topk_select(scores, cnt, kmax)  # head h's indices in its first counts[h] slots
    head = torch.repeat_interleave(torch.arange(h, device=dev), cnt, output_size=total)
    return order[head, torch.arange(total, device=dev) - offset[head]]


@dataclass
class ScoredEviction(Method):
    """Scorer × allocator: score every cached token of a layer, keep the top of each head's budget.

    Subclasses implement `score(ctx) -> (n_kv, L)` (higher = keep; +inf = always keep) and may override
    `layer_budget` (per-layer allocator, e.g. pyramid) or `head_budgets` (per-head allocator, e.g. AdaKV).
    """

    def score(self, ctx: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def layer_budget(self, layer_idx: int, n_layers: int, n_tokens: int) -> int:
        return self.target(n_tokens)

    def head_budgets(self, scores: torch.Tensor, budget: int) -> list[int]:
        return [budget] * scores.shape[0]

    def compress_layer(self, ctx: LayerContext) -> None:
        lens = ctx.layer.head_lengths
        n = max(lens)
        budget = self.layer_budget(ctx.layer_idx, ctx.n_layers, n)
        if budget >= n:
            return
        self.cut(ctx.layer, self.score(ctx), budget)

    def cut(self, layer, scores: torch.Tensor, budget: int) -> None:
        """Keep each head's top rows by `scores` under the allocator's per-head budgets."""
        keep_top(layer, scores, self.head_budgets(scores, budget))


def keep_top(layer, scores: torch.Tensor, per_head: list[int] | torch.Tensor, total: int | None = None,
             pending=None) -> None:
    """Keep head h's per_head[h] highest-scored rows of the layer ((n_kv, L) scores). per_head may instead be
    the (3, n_kv) device layout of a cut made on the device (AdaKV), with its host-known sum `total` and the
    `PendingLengths` queue that will read the head lengths (`LayerKV.keep_ragged`): no host read here."""
    if isinstance(per_head, torch.Tensor):
        from kvbench.methods.kernels import use_triton
        if use_triton(scores, per_head):  # the gather rows from the per-head top-k in one launch
            from kvbench.methods.kernels.ragged_rows import ragged_rows_triton
            from kvbench.methods.kernels.topk_select import topk_select
            order = topk_select(scores, per_head[1], min(scores.shape[1], total))
            layer.keep_rows(ragged_rows_triton(order, per_head, layer.starts, total), per_head, pending)
        else:
            layer.keep_ragged(ragged_topk_indices(scores, per_head, total), per_head, pending)
    elif layer.is_uniform() and len(set(per_head)) == 1:
        layer.keep(topk_indices(scores, per_head[0]), ascending=True)
    elif layer.is_uniform():  # per-head budgets over a fresh prefill (AdaKV): batched, no head loop
        layer.keep_ragged(ragged_topk_indices(scores, per_head), per_head)
    else:
        lens = layer.head_lengths
        layer.keep([topk_indices(scores[h, :lens[h]], per_head[h]) for h in range(scores.shape[0])])


# -- helpers shared by the attention-based scorers --------------------------------------------------
def window_attention(query: torch.Tensor, keys: torch.Tensor, window: int, scaling: float) -> torch.Tensor:
    """Softmax attention of the last `window` queries over all keys of one layer (dense cache).

    query: (n_q, q_len, d) with q_len >= window, the last `window` rows being the last tokens of `keys`;
    keys: (n_kv, L, d). Returns (n_kv, group, window, L) probabilities, causal inside the window, fp32.
    """
    n_q, _, d = query.shape
    n_kv, L, _ = keys.shape
    g = n_q // n_kv
    q = query[:, -window:].float().reshape(n_kv, g, window, d)
    logits = torch.einsum("hgwd,hld->hgwl", q, keys.float()) * scaling
    # query i of the window sits at position L - window + i and may not see later keys
    qpos = torch.arange(L - window, L, device=keys.device).view(window, 1)
    kpos = torch.arange(L, device=keys.device).view(1, L)
    logits = logits.masked_fill(kpos > qpos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pool1d(scores: torch.Tensor, kernel_size: int, kind: str = "max") -> torch.Tensor:
    """Smooth scores along the token dim (SnapKV's clustering step): stride 1, same length.

    As the official SnapKV/PyramidKV code: `F.max_pool1d` / `F.avg_pool1d` with padding kernel_size // 2 and
    avg's default count_include_pad=True (a score near either end is divided by kernel_size, the zero padding
    counted). An even kernel gives one extra output, dropped at the end. The Triton kernel
    (methods/kernels/window_scores.py) pools the same way."""
    if kernel_size <= 1:
        return scores
    x = scores.unsqueeze(1) if scores.dim() == 2 else scores
    pad = kernel_size // 2
    if kind == "max":
        out = torch.nn.functional.max_pool1d(x, kernel_size, stride=1, padding=pad)
    elif kind == "avg":
        out = torch.nn.functional.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=True)
    else:
        raise ValueError(f"pooling={kind!r}; allowed: max, avg")
    out = out[..., : scores.shape[-1]]
    return out.squeeze(1) if scores.dim() == 2 else out


# -- registry ---------------------------------------------------------------------------------------
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def load_all_methods() -> dict[str, type[Method]]:
    import kvbench.methods as pkg
    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.name.startswith("_") and m.name != "kernels":
            importlib.import_module(f"kvbench.methods.{m.name}")
    return METHODS


def check_knobs(cls: type, knobs: dict, prefix: str, owner: str) -> None:
    """Refuse a knob the dataclass `cls` does not have: one line naming it and the allowed ones (methods and
    storage formats alike)."""
    allowed = {f.name for f in fields(cls)}
    bad = sorted(set(knobs) - allowed)
    if bad:
        raise ValueError(f"{prefix}.{bad[0]} is not a knob of {owner}; allowed: {', '.join(sorted(allowed)) or 'none'}")


def build_method(name: str, budget=None, compression_ratio=None, storage=None, selector=None, **knobs) -> Method:
    """A method from its config: its knobs, plus how kept rows are stored (`storage`) and what attention reads
    (`selector`): None, a format name, or {name: ..., knob: value} (kvbench.store)."""
    from kvbench.store import build_storage
    methods = load_all_methods()
    if name not in methods:
        raise ValueError(f"method={name!r}; allowed: {', '.join(sorted(methods))}")
    cls = methods[name]
    check_knobs(cls, knobs, "method", name)
    method = cls(budget=budget, compression_ratio=compression_ratio, **knobs)
    for slot, spec in (("storage", storage), ("selector", selector)):
        fmt = build_storage(spec, slot)
        if not fmt.is_plain and fmt.kind != slot:
            raise ValueError(f"method.{slot}={fmt.name!r} is a {fmt.kind}; allowed as method.{slot}: "
                             + ", ".join(n for n, c in sorted(_formats().items()) if c.kind == slot))
        own = getattr(method, slot)  # a method that is a format itself (method=kivi) set its own
        if own is not None and not own.is_plain and not fmt.is_plain:
            raise ValueError(f"method={name} is the {own.name} {slot} itself; method.{slot}={fmt.name!r} does not "
                             f"combine with it; allowed: method=full method.{slot}={fmt.name}")
        if own is None or own.is_plain:
            setattr(method, slot, fmt)
    if method.storage is not None and not method.storage.is_plain and method.selector is not None \
            and not method.selector.is_plain and not getattr(method.selector, "over_encoded", False):
        raise ValueError(f"method.selector={method.selector.name!r} reads plain rows; it does not compose with "
                         f"method.storage={method.storage.name!r}; allowed: method.storage=plain")
    if method.formats() and method.touches_rows_after_prefill():
        names = "+".join(f.name for f in method.formats())
        raise ValueError(f"method={name} scores or evicts rows while decoding, which a {names} store does not "
                         "support; allowed with storage formats: methods that compress at prefill only "
                         f"({', '.join(sorted(n for n, c in methods.items() if not c.touches_rows_after_prefill()))})")
    return method


def uses_budget(name: str) -> bool:
    """Whether method `name` takes budget / compression_ratio (unknown names: True, build_method says why)."""
    cls = load_all_methods().get(name)
    return cls is None or cls.uses_budget


def _formats() -> dict:
    from kvbench.store import STORAGES
    return STORAGES

