"""Storage formats and selectors: *how* a layer's kept rows are stored and *what* attention reads of them.

A method is a composition (DESIGN.md): which tokens to keep (scorer x allocator, `kvbench.method`), how the kept
rows are stored (a `Storage` format), and what attention reads at each step (a selector, also a `Storage` here,
`kind = "selector"`). The method decides first, on plain rows (`LayerKV`); then the format encodes the layer:
`encode(layer, layer_idx, n_layers)` returns the layer's new store, an `EncodedLayer`, which the cache holds
instead of the `LayerKV`. Cross-layer formats (one store shared by two layers) encode the whole cache at once
in `encode_cache`.

An encoded layer answers what the engine asks of any layer: head lengths (kept tokens), `nbytes()` (bytes
stored, exactly: packed codes + scales + metadata), `read_bytes()` (bytes attention reads per decoded token),
`append` (new tokens: the question, decoded tokens), `attend` (exact attention over what it stores, in its
own format; the torch reference reads `materialize()`, the format's dequantized / reconstructed plain rows),
`clone` (a shared context's copy). Scorers that need keys after encoding ask `materialize()`.

Stores are per sample and hold no knobs: the `Storage` object (a dataclass of knobs, built once per run) makes
them; sharing a compressed context clones stores, never the method.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import torch

from kvbench.cache import HeldBytes, KVBenchCache, LayerKV


@dataclass
class Storage:
    """Base: plain rows in the model's dtype (the `LayerKV` itself; encoding is the identity)."""
    name: ClassVar[str] = "plain"
    kind: ClassVar[str] = "storage"       # "storage" (how rows are stored) or "selector" (what attention reads)
    paper: ClassVar[str] = ""
    per_layer: ClassVar[bool] = True      # False: encodes the whole cache at once (cross-layer formats)
    query_window: ClassVar[int] = 0       # > 0: encode() gets the last this-many post-RoPE queries of the layer

    @property
    def is_plain(self) -> bool:
        return type(self) is Storage

    def check_model(self, n_layers: int, n_kv: int, head_dim: int) -> None:
        """Raise ValueError (one line naming the knob) when this format cannot store this model's cache."""

    def encode(self, layer: LayerKV, layer_idx: int, n_layers: int, query: torch.Tensor | None = None):
        """The layer's store after the method has chosen its rows (default: the plain layer itself).
        query: (n_q, w, d) the layer's last w = `query_window` post-RoPE prefill queries (formats that set
        `query_window`; the question's last tokens when query_aware, else the context's)."""
        return layer

    def encode_cache(self, cache: KVBenchCache) -> None:
        """Encode every layer of a prefilled, compressed cache (cross-layer formats override this)."""
        for i, layer in enumerate(cache.kv):
            if isinstance(layer, LayerKV):
                cache.kv[i] = self.encode_counted(layer, i, len(cache.kv), cache.query_windows.get(i))

    def encode_counted(self, layer: LayerKV, layer_idx: int, n_layers: int, query: torch.Tensor | None = None):
        """`encode`, with the cache's held-bytes meter moved from the plain rows to the encoded store."""
        meter = layer.meter
        before = layer.nbytes()
        store = self.encode(layer, layer_idx, n_layers, query)
        if store is not layer:
            store.meter = meter
            if meter is not None:
                meter.add(store.nbytes() - before)
        return store

    def describe(self) -> dict:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


class EncodedLayer:
    """A layer stored in a format other than plain rows. Subclasses hold their own tensors and implement
    `head_lengths`, `nbytes`, `materialize`, `append`, `clone`; `attend` and `read_bytes` have defaults (the
    torch reference over the materialized rows, all stored bytes)."""
    meter: HeldBytes | None = None

    # -- shape facts (what the engine records) -------------------------------------------------------
    @property
    def head_lengths(self) -> list[int]:
        raise NotImplementedError

    @property
    def n_heads(self) -> int:
        return len(self.head_lengths)

    @property
    def n_rows(self) -> int:
        return sum(self.head_lengths)

    def is_uniform(self) -> bool:
        return len(set(self.head_lengths)) <= 1

    def nbytes(self) -> int:
        """Bytes stored, exactly as held (codes, scales, zero-points, residual rows, indices)."""
        raise NotImplementedError

    def allocated_bytes(self) -> int:
        return self.nbytes()

    row_bytes: int = 0  # key+value bytes of one plain row (the model's dtype): new tokens before encoding

    def read_bytes(self, extra_tokens: int = 0) -> int:
        """Bytes one decode step's attention reads, `extra_tokens` new plain rows per head included
        (default: everything stored)."""
        return self.nbytes() + extra_tokens * self.n_heads * self.row_bytes

    def attention_flops(self, extra_tokens: int, group: int) -> int:
        """Matmul FLOPs of one decode step's attention (QK^T and PV per query head, 2 per multiply-add), with
        `extra_tokens` new rows per head. Default: full-dimension attention over every row (formats that read
        fewer rows or attend at a lower dimension override it)."""
        d = getattr(self, "head_dim", None) or self.materialize().keys.shape[1]
        return 4 * d * group * sum(n + extra_tokens for n in self.head_lengths)

    # -- reads ---------------------------------------------------------------------------------------
    def materialize(self) -> LayerKV:
        """A plain copy of what this store represents (dequantized / reconstructed), rows in the order
        attention sees them (older first; the newest appended tokens last)."""
        raise NotImplementedError

    def attend(self, query: torch.Tensor, scaling: float, need_probs: bool = False, window: int | None = None,
               softcap: float | None = None):
        """Exact attention over the stored format. Default: the torch reference over `materialize()`."""
        from kvbench.attention import attend
        return attend(query, self.materialize(), scaling, need_probs, window, softcap)

    # -- mutation ------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        raise NotImplementedError

    def reserve(self, extra: int) -> None:
        """Room for `extra` more tokens (a hint; stores that grow by concatenation ignore it)."""

    def clone(self):
        raise NotImplementedError

    # -- the GPU fast path (kvbench/fast_decode.py): a fixed-capacity layout stepped on the device ------
    # A format that sets `device_decode` decodes inside the CUDA graph: `device_begin(extra)` lays it out with
    # room for `extra` tokens per head (no buffer moves afterwards); `device_step` appends one token and
    # attends, as `append` then `attend` do, reading every count from device memory (no host sync, so a graph
    # replays it); `device_end` brings the host-side view (lengths, bytes) up to date. The fast path's records
    # come from `nbytes_after` / `read_bytes_at` (host arithmetic on the state at `device_begin`; a format whose
    # bytes depend on what it decodes sets `records_after_decode` and answers from what it logged, after
    # `device_end`). `device_first_step_differs`: the first step runs outside the graph (MiniCache's merge of
    # the question on top).
    device_decode: bool = False
    records_after_decode: bool = False
    device_first_step_differs: bool = False

    def device_begin(self, extra: int) -> None:
        raise NotImplementedError

    def device_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                    scaling: float) -> torch.Tensor:
        """q (n_q, d), k / v (n_kv, d): the token's post-RoPE query, key, value; pos (1,) int64 its position.
        Returns the attention output (n_q, d) over every row the format holds, the new token included."""
        raise NotImplementedError

    def device_end(self) -> None:
        raise NotImplementedError

    def nbytes_after(self, t: int) -> int:
        """Bytes stored after `t` more tokens appended one at a time (default: each a plain row per head)."""
        return self.nbytes() + t * self.n_heads * self.row_bytes

    def read_bytes_at(self, t: int) -> int:
        """What the engine loop records before decode step t (0-based): `read_bytes(1)` after t appends."""
        return self.read_bytes(extra_tokens=t + 1)

    def _changed(self, before: int) -> None:
        """Report a change of the bytes held to the cache's meter (call with nbytes() from before)."""
        if self.meter is not None:
            self.meter.add(self.nbytes() - before)

    def __deepcopy__(self, memo):
        return self  # as LayerKV: a cache layer belongs to the engine, forking a method never copies it


def tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# -- registry ---------------------------------------------------------------------------------------
STORAGES: dict[str, type[Storage]] = {"plain": Storage}


def register_storage(name: str) -> Callable[[type[Storage]], type[Storage]]:
    def deco(cls):
        cls.name = name
        STORAGES[name] = cls
        return cls
    return deco


def build_storage(spec, slot: str = "storage") -> Storage:
    """A storage format from a config: None / "plain", a name, or {name: ..., knob: value, ...}.
    slot: the config key it came from (storage or selector), named in errors."""
    from kvbench.method import check_knobs, load_all_methods
    load_all_methods()  # formats live in methods/ beside the methods that introduce them
    if spec is None:
        return Storage()
    knobs = dict(spec) if not isinstance(spec, str) else {"name": spec}
    name = knobs.pop("name", "plain")
    if name not in STORAGES:
        raise ValueError(f"method.{slot}={name!r}; allowed: {', '.join(sorted(STORAGES))}")
    cls = STORAGES[name]
    check_knobs(cls, knobs, f"method.{slot}", f"{cls.kind} {name}")
    return cls(**knobs)
