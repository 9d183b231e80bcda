"""Static-shape greedy decoding over the ragged KV cache, replayed from a CUDA graph on the GPU.

At batch 1 a decode step of an 8B model is memory-bound: it should cost about (weight bytes + KV bytes) /
memory bandwidth (~5 ms on an H100). The eager engine loop adds host work per layer (Python, hundreds of
kernel launches, syncs), which at this size costs as much as the step itself. This path removes it:
1. every head gets capacity for all new tokens up front (`KVBenchCache.reserve`), so no buffer moves;
2. one custom op per layer (`kvbench::append_decode_attention`) writes the new key/value rows at
   `starts + lengths`, bumps `lengths` in place on the device, and runs the Triton split-K decode kernel,
   which reads the lengths from device memory (no host sync);
3. so the whole step, the greedy argmax and the position increment included, is captured once with
   `torch.cuda.graph` and replayed for every later token (PyTorch's CUDA graphs; the same trick as
   transformers' static cache + "reduce-overhead" compile).
4. `compile=True` additionally runs the step through `torch.compile` (Inductor) before capturing it: the
   dozens of small element-wise kernels per layer (RMSNorm, RoPE, SiLU·up, residual adds) fuse into a few,
   which is what is left between a graph of eager kernels and the bandwidth limit. The custom op is opaque
   to the compiler (declared mutations of the cache tensors, applied in place), so the cache layout and the
   Triton kernel are the same as without compiling.
5. Without compiling, every plain nn.Linear applied to the step's one token runs a Triton GEMV
   (methods/kernels/gemv.py; `triton_linears`, `KVBENCH_DECODE_GEMV=auto|fused|triton|cublas`) instead of
   cuBLAS, which reads the small batch-1 weights well below the bandwidth on Hopper (H200, Llama-3.1-8B shape,
   every linear once: 4.02 ms against cuBLAS's 4.61 ms, a 3.57 ms copy roofline; reports/examples/gemv_h200.txt);
   `fused` (auto's choice) also computes a layer's q/k/v projections in one launch and a Llama MLP's
   SiLU(gate) * up in one, and adds a Llama layer's residuals in the stores of o_proj's and down_proj's GEMVs
   (H200, 8B shape, snapkv at 32K: 4.26 ms per step, 1.19x the copy roofline, against 4.79 ms unfused and 6.86
   with cuBLAS and transformers' ops; reports/examples/decode_fused_h200.md). Every Llama-style RMSNorm runs
   one Triton launch (methods/kernels/rmsnorm.py; `triton_norms`, `KVBENCH_DECODE_NORM=auto|triton|torch`)
   instead of transformers' ~7 small kernels, and so does the rotary embedding of the token's queries and keys
   (methods/kernels/rope.py; `triton_rope`, `KVBENCH_DECODE_ROPE=auto|triton|torch`).
Qualify (`supports`, `plan`): methods without decode-time hooks (full, snapkv, pyramidkv, adakv, ...); methods
whose decode-time eviction is a rolling window (StreamingLLM, recent: `Method.decode_ring`, run as a ring
buffer by the append kernel while no head holds more than the window); and methods that describe their
decode-time eviction (`decode_eviction(cache) -> DecodeEviction`: H2O, TOVA, StreamingLLM / recent over a
question fed on top of the window, CAKE, D2O, LaCache, DuoAttention's streaming heads). For those the step's
attention also returns each row's probability where the rule reads it (summed over the query group), and
`kvbench::decode_evict` removes every over-full head's victim on the device as the engine loop's
`LayerKV.remove` does (the last row moves into the victim's row: one row copied, the engine loop's row order
kept, so equal keys pick the same victim; methods/kernels/decode_evict.py); a head holds at most cap + 1 rows,
during the step. A first step over heads holding more than cap (a question fed on top) repeats the removal
down to cap, eagerly, before the graph is captured. A method with decode-time hooks that declares neither
keeps the eager engine loop, and so does a cache the step cannot keep right (see `plan`). Storage formats
that step on the device (`EncodedLayer.device_decode`: KIVI, FlexGen, Quest, ThinK, EigenAttention, MiniCache;
kvbench/store.py) decode here too, under a method without decode-time hooks: `device_begin` lays each out with
fixed capacity and the attention call runs its `device_step` (append, KIVI's flushes, Quest's page selection and
MiniCache's merge across layers included, every count in device memory); the engine's records for them come
from `EncodedRecords` (MiniCache's from its merge log, after decoding). On CPU this runs
the same in-place step eagerly (use_graph=False), which is what the tests compare with the engine loop.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvbench import attention
from kvbench.attention import session
from kvbench.cache import KVBenchCache, LayerKV
from kvbench.compat import cache_kwargs
from kvbench.method import Method
from kvbench.metrics import gc_paused


@dataclass(frozen=True)
class DecodeEviction:
    """A method's decode-time eviction, declared for the device (`Method.decode_eviction(cache)`): after every
    decode step's attention, each head holding more than its cap drops the row with the lowest key until it
    holds cap (methods/kernels/decode_evict.py computes the keys):
    rank "position": the oldest row; "attention": the step's attention probability of the row (summed over the
    head's query group; with `pool` > 1 average-pooled over the head's rows in position order, CAKE); "score":
    side data `score`, to which every step's attention is added first; "scheduled": the row whose position has
    the rank `schedule` gives (a rule that depends only on how many rows a head holds: LaCache's ladder).
    Rows at positions < n_sink and at the `recent[layer]` newest positions are never evicted. shared: one
    victim per layer from the keys summed over heads, the same row in every head.
    schedule(layer, rows, commit) -> per step, the ranks (in position order, before the step's removals) the
    step removes, where rows[i] is how many rows each head holds during step i; with commit the method's own
    state moves on by those steps (the decoder calls it so once it knows how many steps it took).
    merge_tau (D2O): per layer, per head, the similarity threshold (None: the first removal sets it); each
    victim first merges into its most similar row (methods/kernels/decode_evict.py's merge_victims), the
    thresholds move on as an EMA of weight merge_beta, and store_tau(layer, taus) hands them back after decoding."""
    caps: tuple              # per layer: rows a head keeps between steps (None: that layer never evicts), or a
                             # tuple of per-head caps (None: that head never evicts; DuoAttention's retrieval heads)
    rank: str                # "position" | "attention" | "score" | "scheduled"
    n_sink: int = 0
    recent: tuple = ()       # per layer (empty: no protected recent window)
    shared: bool = False
    score: str | None = None  # side data accumulating every step's attention (H2O's scores)
    pool: int = 0            # rank "attention": average-pooling kernel over position order (0, 1: none)
    schedule: object = None  # rank "scheduled": the callable above
    merge_tau: tuple = ()    # per layer, per head (empty: no merging)
    merge_beta: float = 0.0
    store_tau: object = None  # callable(layer, taus) with merge_tau

    def __post_init__(self):
        from kvbench.methods.kernels.decode_evict import RANKS
        if self.rank not in RANKS:
            raise ValueError(f"rank={self.rank!r}; allowed: {', '.join(RANKS)}")
        if self.rank == "score" and self.score is None:
            raise ValueError("rank 'score' needs the side data's name (score=...)")
        if (self.rank == "scheduled") != (self.schedule is not None):
            raise ValueError("rank 'scheduled' and schedule=... go together")
        if self.pool > 1 and self.rank != "attention":
            raise ValueError(f"pool={self.pool} pools the step's attention; allowed with rank 'attention' only")
        if self.merge_tau and (len(self.merge_tau) != len(self.caps) or self.store_tau is None):
            raise ValueError("merge_tau needs one entry per layer and store_tau=...")
        if self.recent and len(self.recent) != len(self.caps):
            raise ValueError(f"recent has {len(self.recent)} entries for {len(self.caps)} layers")

    @property
    def needs_probs(self) -> bool:
        return self.rank in ("attention", "score") or self.score is not None


def head_caps(cap, n_heads: int) -> list:
    """One layer's entry of `caps` (an int, None, or a per-head tuple) as a per-head list."""
    if isinstance(cap, (tuple, list)):
        if len(cap) != n_heads:
            raise ValueError(f"{len(cap)} per-head caps for a layer of {n_heads} heads")
        return list(cap)
    return [cap] * n_heads


@dataclass(frozen=True)
class Plan:
    """How the fast path decodes a method over a cache: plain appends, a ring (n_sink, cap), or an eviction."""
    ring: tuple[int, int] | None = None
    evict: DecodeEviction | None = None

    def caps(self, n_layers: int) -> list:
        """Per layer: the most rows a head keeps between steps (None: it only grows; a tuple: per head)."""
        if self.ring is not None:
            return [self.ring[1]] * n_layers
        return list(self.evict.caps) if self.evict is not None else [None] * n_layers


def _defined_by(cls: type, name: str) -> type | None:
    return next((k for k in cls.__mro__ if name in k.__dict__), None)


def _describes_eviction(method: Method) -> bool:
    """The method declares its decode-time eviction, and the class that declares it is the one whose
    `on_decode` it describes (a subclass with another `on_decode` does not inherit the promise)."""
    cls = type(method)
    owner = _defined_by(cls, "decode_eviction")
    return owner is not None and owner is _defined_by(cls, "on_decode")


def supports(method: Method | None) -> bool:
    """True when the method does nothing at decode time (its hooks would not run inside a graph), rolls a
    window (`Method.decode_ring`: a ring buffer on the device) or describes its eviction (`decode_eviction`)."""
    if method is None or _describes_eviction(method):
        return True
    if method.needs_decode_probs:
        return False
    return type(method).on_decode is Method.on_decode or method.decode_ring() is not None


def _plain_attention(model: torch.nn.Module) -> bool:
    """No sliding window and no score soft cap in any layer: what the storage formats' device steps compute."""
    configs = [model.config, getattr(model.config, "text_config", None)]
    for c in filter(None, configs):
        if getattr(c, "attn_logit_softcapping", None) or "sliding_attention" in (getattr(c, "layer_types", None) or ()):
            return False
        if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
            return False
    return True


def plan(method: Method | None, cache: KVBenchCache, model: torch.nn.Module | None = None) -> Plan | None:
    """How this method decodes on the fast path over this cache, or None (the engine loop): plain rows, or
    storage formats that step on the device (`EncodedLayer.device_decode`; a model without sliding windows or
    soft caps, a method without decode-time hooks), and only side data the in-place step keeps right (a
    log-weight: new rows weigh 1, spare rows are zeroed; the eviction's scores; a ring overwrites rows, so it
    takes none)."""
    if not supports(method):
        return None
    encoded = [layer for layer in cache.kv if not isinstance(layer, LayerKV)]
    if encoded:  # storage formats: those that step on the device, under a method with no decode-time hooks
        if not all(getattr(layer, "device_decode", False) for layer in encoded) or (model is not None and not
                                                                                     _plain_attention(model)):
            return None
        if method is not None and (type(method).on_decode is not Method.on_decode or method.needs_decode_probs):
            return None
    side = set().union(*(layer.side for layer in cache.kv if isinstance(layer, LayerKV)))
    if method is None or (type(method).on_decode is Method.on_decode and not method.needs_decode_probs):
        return Plan() if side <= {"log_weight"} else None
    ring = method.decode_ring()
    if ring is not None and not side and ring_fits(cache, ring):
        return Plan(ring=ring)
    evict = method.decode_eviction(cache) if _describes_eviction(method) else None
    if evict is None or not side <= {"log_weight", evict.score}:
        return None
    if (evict.shared or evict.rank == "scheduled") and any(len(set(layer.head_lengths)) > 1 for layer in cache.kv):
        return None  # one row index (one schedule) for every head needs heads of one length
    return Plan(evict=evict)


def step_rows(lens0: list[list[int]], caps: list, i: int) -> list[list[int]]:
    """Rows each head attends over at decode step i (0-based), from its rows before decoding: its rows before
    the step plus the token being decoded; after a step, a head with a cap is back to at most cap (the first
    step evicts a question on top down to it). caps: per layer an int, None or per-head caps."""
    return [[(L + i if c is None or i == 0 else min(L + i, c)) + 1 for L, c in zip(lens, head_caps(cap, len(lens)))]
            for lens, cap in zip(lens0, caps)]


def held_peak(lens0: list[list[int]], caps: list, row_bytes: list[int], n_steps: int,
              ring: bool = False) -> int:
    """The most K/V bytes held at any point of n_steps decode steps. Layer by layer a step appends the new
    token (+1 row per head), attends, then evicts back to the cap; a ring keeps its cap + 1 rows between
    steps (its oldest row waits for the next token)."""
    now = [b * sum(lens) for b, lens in zip(row_bytes, lens0)]
    total = peak = sum(now)
    for i in range(n_steps):
        during = [b * sum(r) for b, r in zip(row_bytes, step_rows(lens0, caps, i))]
        after = during if ring else [b * (sum(r) - len(r)) for b, r in zip(row_bytes, step_rows(lens0, caps, i + 1))]
        for layer in range(len(now)):
            peak = max(peak, total - now[layer] + during[layer])
            total += after[layer] - now[layer]
        now = after
    return peak


def ring_fits(cache: KVBenchCache, ring: tuple[int, int] | None) -> bool:
    """A rolling window runs on the device only if no head already holds more than its cap."""
    return ring is None or all(max(l.head_lengths, default=0) <= ring[1] for l in cache.kv if l is not None)


def _sort_rows_by_position(cache: KVBenchCache) -> None:
    """The ring overwrites the oldest non-sink row by walking rows in order: make each head's rows ascending
    in position (already so after prefill/compression; decode-time `remove` can shuffle them). One sync."""
    flags = []
    for layer in cache.kv:
        heads = [layer.head(h)[2] for h in range(layer.n_heads)]
        flags.append(torch.stack([(p[1:] >= p[:-1]).all() for p in heads]).all())
    for layer, ok in zip(cache.kv, torch.stack(flags).tolist()):
        if not ok:
            layer._repack(list(layer._caps), [torch.argsort(layer.head(h)[2]) for h in range(layer.n_heads)])


@torch.library.custom_op("kvbench::append_decode_attention",
                         mutates_args=("keys", "values", "positions", "lengths", "ring_next"))
def append_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
                            keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                            starts: torch.Tensor, lengths: torch.Tensor, ring_next: torch.Tensor,
                            ring_rows: int, n_sink: int, scaling: float, softcap: float = 0.0,
                            window: int = 0, log_weight: torch.Tensor | None = None,
                            need_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one token (k_new, v_new: (h, d); pos: (1,)) to every KV head's reserved spare row (or, with
    ring_rows > 0, over row ring_next[h] once the head holds ring_rows: see methods/kernels/append.py), then
    attend with q (n_q, d) over each head's rows. Returns (n_q, d) and, with need_probs, the (T,) row-aligned
    attention probabilities summed over each head's query group (else an empty tensor). Capacity is the
    caller's promise. softcap / window (0: none): Gemma-2's score soft cap and a sliding window of positions
    (the new token is at `pos`), as kvbench.attention.attend. log_weight (T,): per-row logit bias of merged
    rows (RazorAttention's compensation token); the appended rows' entries are 0 already (spare rows and
    evicted rows are zeroed)."""
    from kvbench.methods import kernels
    args = (k_new, v_new, pos, keys, values, positions, starts, lengths)
    opts = dict(softcap=softcap or None, window=window or None, positions=positions, q_pos=pos,
                log_weight=log_weight, return_probs=need_probs)
    if attention._decode_kernel(q) == "triton":
        kernels.ragged_append_triton(*args, ring_next=ring_next, ring_rows=ring_rows, n_sink=n_sink)
        res = kernels.ragged_decode_attention_triton(q, keys, values, starts, lengths, scaling, **opts)
    else:
        kernels.ragged_append_ref(*args, ring_next=ring_next, ring_rows=ring_rows, n_sink=n_sink)
        res = kernels.ragged_decode_attention_ref(q, keys, values, starts, lengths, scaling, **opts)
    return res if need_probs else (res, q.new_empty(0, dtype=torch.float32))


@append_decode_attention.register_fake
def _(q, k_new, v_new, pos, keys, values, positions, starts, lengths, ring_next, ring_rows, n_sink, scaling,
      softcap=0.0, window=0, log_weight=None, need_probs=False):
    return torch.empty_like(q), q.new_empty(keys.shape[0] if need_probs else 0, dtype=torch.float32)


@torch.library.custom_op("kvbench::decode_evict",
                         mutates_args=("probs", "keys", "values", "positions", "lengths", "score", "log_weight",
                                       "done", "tau"))
def decode_evict(probs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 starts: torch.Tensor, lengths: torch.Tensor, score: torch.Tensor | None,
                 log_weight: torch.Tensor | None, q_pos: torch.Tensor, caps: torch.Tensor,
                 ranks: torch.Tensor | None, done: torch.Tensor | None, tau: torch.Tensor | None, width: int,
                 repeat: int, rank: str, n_sink: int, recent: int, shared: bool, pool: int, beta: float) -> None:
    """After a step's attention: the scores accumulate, every head over its cap (caps: (h,)) removes its
    victim, `repeat` times (methods/kernels/decode_evict.py). probs: the step's (T,) probabilities, or empty
    if unused; ranks / done: a scheduled rank's ranks and each head's removals so far; tau: D2O's merge
    thresholds (h,), moved on with weight beta. Where the decode kernel is Triton, a step takes one launch
    (kernels.fused_evict_ok: D2O's merge included; CAKE's pooling takes two), or LaCache's torch choice and one
    launch for the moves (kernels.evict_rows_split); the rest of a first step over a question, and the CPU,
    torch ops."""
    from kvbench.methods import kernels
    args = (probs if probs.numel() else None, keys, values, positions, starts, lengths, score, log_weight, q_pos,
            caps, width, repeat, rank, n_sink, recent, shared, pool, ranks, done, tau, beta)
    triton = attention._decode_kernel(keys) == "triton"
    if triton and kernels.fused_evict_ok(rank, pool, tau, repeat, shared, score):
        kernels.evict_rows_triton(*args)
    elif triton and repeat == 1:  # LaCache's scheduled rank: torch chooses, Triton moves
        kernels.evict_rows_split(*args)
    else:
        kernels.evict_rows(*args)


@decode_evict.register_fake
def _(probs, keys, values, positions, starts, lengths, score, log_weight, q_pos, caps, ranks, done, tau, width,
      repeat, rank, n_sink, recent, shared, pool, beta):
    return None


NO_CAP = 2 ** 62  # a head's cap on the device when it never evicts


class _Evict(NamedTuple):
    """One layer's eviction inside the step (constants of the captured graph; its device tensors are in
    `_EvictTensors`)."""
    rank: str
    n_sink: int
    recent: int
    shared: bool
    score: str | None
    needs_probs: bool
    pool: int
    beta: float   # D2O's threshold EMA weight (merging when the layer's tensors hold tau)
    width: int    # the most rows an evicting head holds during the step (cap + 1; more on a first step over a question)
    repeat: int   # removals per head: 1, the excess on a first step over a question, 0 to only accumulate


class _EvictTensors(NamedTuple):
    caps: torch.Tensor                  # (h,) a head holding more rows than this removes one per repeat
    ranks: torch.Tensor | None = None   # rank "scheduled": the position rank of every removal, in order
    done: torch.Tensor | None = None    # (h,) removals so far (indexes ranks)
    tau: torch.Tensor | None = None     # (h,) float64 D2O's merge thresholds (NaN: unset)


def _in_removal_order(ranks: list[int]) -> list[int]:
    """Ranks in position order before any removal -> the rank of each at its turn, the earlier ones removed."""
    return [r - sum(o < r for o in ranks[:k]) for k, r in enumerate(ranks)]


class _LayerStep(NamedTuple):
    ring_rows: int   # > 0: a head holding this many rows overwrites row ring_next[h] (append.py's ring mode)
    n_sink: int      # the ring's sinks (a rolling window)
    evict: _Evict | None = None


def inplace_attention(module, query, key, value, state, scaling, window=None, softcap=None):
    """The attention function's fast path (kvbench/attention.py routes here while a FastDecoder runs)."""
    if query.shape[0] != 1 or query.shape[2] != 1:
        raise ValueError(f"fast decode feeds one token at batch 1, got query shape {tuple(query.shape)}")
    layers, pos, ring_next, steps, evict_tensors = state
    i = module.layer_idx
    layer, step = layers[i], steps[i]
    if not isinstance(layer, LayerKV):  # a storage format stepping its own device layout (kvbench/store.py)
        if window or softcap:
            raise ValueError(f"{type(layer).__name__}'s device step has no sliding window or soft cap")
        out = _encoded_step(layer, query[0, :, 0], key[0, :, 0], value[0, :, 0], pos.view(1), scaling)
        return out.view(1, 1, *out.shape), None
    ev = step.evict
    log_weight = layer.side.get("log_weight")
    out, probs = append_decode_attention(query[0, :, 0], key[0, :, 0], value[0, :, 0], pos.view(1), layer.keys,
                                         layer.values, layer.positions, layer.starts, layer.lengths, ring_next[i],
                                         step.ring_rows, step.n_sink, scaling, float(softcap or 0.0),
                                         int(window or 0), log_weight, ev is not None and ev.needs_probs)
    if ev is not None:
        t = evict_tensors[i]
        decode_evict(probs, layer.keys, layer.values, layer.positions, layer.starts, layer.lengths,
                     layer.side[ev.score] if ev.score else None, log_weight, pos.view(1), t.caps, t.ranks, t.done,
                     t.tau, ev.width, ev.repeat, ev.rank, ev.n_sink, ev.recent, ev.shared, ev.pool, ev.beta)
    return out.view(1, 1, *out.shape), None  # (1, q=1, n_q, d) as transformers expects


@torch.compiler.disable  # a compiled step calls the format's own kernels as they are (a graph break)
def _encoded_step(layer, q, k, v, pos, scaling):
    return layer.device_step(q, k, v, pos, scaling)


class EncodedRecords:
    """What the engine loop records over n_steps decode steps of a cache holding storage formats: per step the K/V
    bytes attention reads and its FLOPs, and after k steps (k = 0 ... n_steps) the most bytes held so far, layer by
    layer as the loop's meter sees each append. Built from the cache's state before decoding; a format whose bytes
    depend on what it decoded (`records_after_decode`: MiniCache's retained tokens) gives its own after decoding,
    from its device log (`get` then)."""

    def __init__(self, cache: KVBenchCache, n_steps: int, group: int):
        self.layers = [layer for layer in cache.kv if layer is not None]
        self.n_steps = n_steps
        self.flops = [sum(layer.attention_flops(t + 1, group) for layer in self.layers) for t in range(n_steps)]
        self.series = [None if getattr(layer, "records_after_decode", False) else self._series(layer, n_steps)
                       for layer in self.layers]

    @staticmethod
    def _series(layer, n: int) -> tuple[list[int], list[int]]:
        """(bytes stored after t appends, t = 0 .. n; bytes read at step t, t < n)."""
        if isinstance(layer, LayerKV):
            new = layer.n_heads * layer.row_bytes
            return [layer.nbytes() + t * new for t in range(n + 1)], [layer.read_bytes(t + 1) for t in range(n)]
        return [layer.nbytes_after(t) for t in range(n + 1)], [layer.read_bytes_at(t) for t in range(n)]

    def get(self, n_steps: int | None = None) -> tuple[list[int], list[int], list[int]]:
        """(reads, flops, peaks) over the first n_steps (default all): after decoding where a format needs it."""
        n = self.n_steps if n_steps is None else n_steps
        series = [s if s is not None else self._series(layer, n) for s, layer in zip(self.series, self.layers)]
        reads = [sum(r[t] for _, r in series) for t in range(n)]
        now = [st[0] for st, _ in series]
        total = peak = sum(now)
        peaks = [peak]
        for t in range(n):
            for j, (st, _) in enumerate(series):
                total += st[t + 1] - now[j]
                now[j] = st[t + 1]
                peak = max(peak, total)
            peaks.append(peak)
        return reads, self.flops[:n], peaks


class _InPlaceCache(KVBenchCache):
    """Shares the layers of a reserved KVBenchCache. `update` stores nothing: the attention function's fast
    path appends (inside the custom op). `seen_tokens` stays at its value from before decoding: it only
    sizes transformers' mask, which kvbench's attention does not use, and a constant keeps one compiled
    graph valid for every step (the host copies are refreshed by `FastDecoder.finish`)."""

    def __init__(self, base: KVBenchCache):
        super().__init__(len(base.kv))
        self.kv = base.kv
        self.seen_tokens = base.seen_tokens

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length, layer_idx=0):
        # transformers may pass the cache positions (a tensor): int() of it would sync inside the capture
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seen_tokens + q, 0


def _step(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, cache: KVBenchCache) -> torch.Tensor:
    """One greedy step: logits of the token in `ids`, then `ids` <- argmax and `pos` += 1, on the device."""
    out = model(input_ids=ids, **cache_kwargs(model, cache, pos), use_cache=True, logits_to_keep=1)
    ids.copy_(out.logits[:, -1:].argmax(-1))  # greedy, on the device: no sync inside the step
    pos.add_(1)
    return out.logits[0, -1]


_COMPILED: dict[str, object] = {}


def compiled_step(backend: str):
    """`_step` through torch.compile, one per backend per process (its guards decide when to recompile:
    other model, other cache buffer sizes; after the second size, shapes are compiled as dynamic)."""
    if backend not in _COMPILED:
        # coordinate-descent tuning makes Inductor lower the batch-1 matmuls (GEMVs) to its own reduction
        # kernels, tuned per shape, instead of cuBLAS (measured on an H100, Llama-3.1-8B shape: cuBLAS's
        # GEMVs alone took 1.19x the copy roofline); it is what gpt-fast compiles with
        options = {"coordinate_descent_tuning": True} if backend == "inductor" else None
        _COMPILED[backend] = torch.compile(_step, backend=backend, dynamic=None, options=options)
    return _COMPILED[backend]


def default_compile() -> bool | str:
    """KVBENCH_COMPILE_DECODE=0|1|regional (default 0): the engine's GPU decode path compiles its whole step
    (1) or each decoder layer's modules but attention (regional: see `regional`)."""
    v = os.environ.get("KVBENCH_COMPILE_DECODE", "0")
    if v not in ("0", "1", "regional"):
        raise ValueError(f"KVBENCH_COMPILE_DECODE={v!r}; allowed: 0, 1, regional")
    return "regional" if v == "regional" else v == "1"


GEMV_MODES = ("auto", "fused", "triton", "cublas")  # auto's choice first after it, the off switch last
NORM_MODES = ROPE_MODES = ("auto", "triton", "torch")
# norms whose forward is exactly `rmsnorm_ref` (transformers' Llama formula); Gemma's (1 + weight) is not
LLAMA_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (with a SiLU act_fn: `silu_mul_ref`)
LLAMA_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
# decoder layers whose forward is x + mlp(post_norm(x + self_attn(input_norm(x)))), attentions that end in o_proj
LLAMA_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
LLAMA_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


def _env_mode(var: str, modes: tuple[str, ...]) -> str:
    v = os.environ.get(var, modes[0])
    if v not in modes:
        raise ValueError(f"{var}={v!r}; allowed: {', '.join(modes)}")
    return v


def default_gemv() -> str:
    """KVBENCH_DECODE_GEMV=auto|fused|triton|cublas (default auto): the batch-1 linears of the graph decode path.
    triton: one Triton GEMV per linear; fused: the same, with each layer's q/k/v projections in one launch and
    its MLP's SiLU(gate) * up in another (`triton_linears`). auto: fused on CUDA when the step is not compiled
    (Inductor then generates its own GEMVs)."""
    return _env_mode("KVBENCH_DECODE_GEMV", GEMV_MODES)


def default_norm() -> str:
    """KVBENCH_DECODE_NORM=auto|triton|torch (default auto): the RMSNorms of the graph decode path. auto: one
    Triton launch per norm on CUDA when the step is not compiled (Inductor then fuses them itself)."""
    return _env_mode("KVBENCH_DECODE_NORM", NORM_MODES)


def default_rope() -> str:
    """KVBENCH_DECODE_ROPE=auto|triton|torch (default auto): the rotary embedding of the graph decode path. auto:
    one Triton launch for the queries and keys on CUDA when the step is not compiled."""
    return _env_mode("KVBENCH_DECODE_ROPE", ROPE_MODES)


def _swappable(m: torch.nn.Module) -> bool:
    """A module whose call can be replaced: not compiled, no hooks (a hooked module keeps its own call)."""
    return m._compiled_call_impl is None and not (m._forward_hooks or m._forward_pre_hooks)


@contextlib.contextmanager
def _calls_replaced(mods: list, make_call):
    """While active, each module's call is make_call(module): set as its `_compiled_call_impl`, which nn.Module's
    call runs instead of its hooks and forward (what `nn.Module.compile` sets)."""
    for m in mods:
        m._compiled_call_impl = make_call(m)
    try:
        yield
    finally:
        for m in mods:
            m._compiled_call_impl = None


def check_not_compiled(knob: str, mode: str, modes: tuple[str, ...], compiled, compiled_by: str) -> None:
    """A decode kernel forced to Triton cannot go with a compiled step (Inductor generates the step's kernels):
    one line naming the knob and its allowed values then (modes: auto, the Triton kernels, the off switch)."""
    if mode not in (modes[0], modes[-1]) and compiled:
        raise ValueError(f"{knob}={mode!r} with {compiled_by}; allowed: {knob} {modes[0]} or {modes[-1]} when "
                         "compiling (Inductor generates its own kernels for the step)")


def _kernel_mode(knob: str, mode: str, modes: tuple[str, ...], compile, auto: bool) -> str | None:
    """A decode kernel knob (gemv / norm / rope): the Triton kernel in effect (one forced, or modes[1] where
    `auto` allows), or None (torch's own ops)."""
    if mode not in modes:
        raise ValueError(f"{knob}={mode!r}; allowed: {', '.join(modes)}")
    check_not_compiled(knob, mode, modes, compile, "a compiled step")
    if mode == modes[0]:
        return modes[1] if auto else None
    return None if mode == modes[-1] else mode


def _one_token(x: torch.Tensor) -> bool:
    return x.shape[:-1].numel() == 1  # a GEMV (a decode step's only case; more tokens kept correct anyway)


def triton_linears(model: torch.nn.Module, fused: bool = False, fold_norms: bool = False):
    """While active, every plain nn.Linear of the model (exact type: a quantized subclass keeps its own call;
    contiguous weight rows) applied to one token runs `gemv_triton`; outside the context the model is untouched.
    fused: also, where a module's q_proj, k_proj and v_proj are such linears of one input size and dtype (all with
    bias or none), q_proj's call computes all three in one launch (`gemv_many_triton`) and hands k_proj and v_proj
    their rows when they are called on that same input tensor (otherwise they compute their own); and a Llama MLP
    (LLAMA_MLPS, SiLU, such gate/up linears without bias) computes SiLU(gate) * up in one launch
    (`gemv_silu_mul_triton`) before its down projection; and a Llama decoder layer (LLAMA_LAYERS, with a
    LLAMA_ATTENTIONS attention and a LLAMA_MLPS MLP whose o_proj and down_proj are such linears) hands each of its
    two residuals to the linear that ends the branch, which adds it in its GEMV's store (`_fused_layer`).
    fold_norms (with fused; the Triton norms' setting): such a layer whose two norms are LLAMA_RMSNORMS over at
    most FOLD_MAX_HIDDEN values also hands each norm to the fused launch after it (q/k/v, SiLU(gate) * up), which
    normalizes its input first: two launches fewer per layer, the same bits as the norm's own kernel
    (`_norm_rstd` sums as `_rmsnorm_kernel`)."""
    from kvbench.methods.kernels import gemv as G
    F = torch.nn.functional
    residuals: dict = {}  # linear -> the residual its output is to be added to (set by a fused layer's call)
    prenorm: dict = {}    # q_proj / an MLP -> the RMSNorm its fused launch applies first (set by a fused layer)
    qkv_fused, mlp_fused = set(), set()

    def plain(linear):
        def call(x: torch.Tensor) -> torch.Tensor:
            res = residuals.pop(linear, None) if residuals else None
            if not _one_token(x) or (res is not None and res.numel() != linear.out_features):
                y = F.linear(x, linear.weight, linear.bias)
                return y if res is None else res + y
            if res is None:
                return G.gemv_triton(x, linear.weight, linear.bias)
            return G.gemv_triton(x, linear.weight, linear.bias, residual=res.to(x.dtype).contiguous())
        return call
    calls = {m: plain(m) for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dim() == 2
             and m.weight.stride(-1) == 1 and _swappable(m)}
    if fused:
        for m in model.modules():
            projs = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj")]
            if all(p in calls for p in projs) and len({(p.in_features, p.weight.dtype, p.weight.device,
                                                         p.bias is None) for p in projs}) == 1:
                calls.update(_fused_qkv(projs, calls, G.gemv_many_triton, prenorm))
                qkv_fused.add(m)
            act = type(getattr(m, "act_fn", None)).__name__
            gate_up = [getattr(m, n, None) for n in ("gate_proj", "up_proj")]
            if (type(m).__name__ in LLAMA_MLPS and act in ("SiLU", "SiLUActivation") and _swappable(m)
                    and all(p in calls and p.bias is None for p in gate_up)
                    and gate_up[0].weight.shape == gate_up[1].weight.shape):
                calls[m] = _fused_mlp(m, G.gemv_silu_mul_triton, prenorm)
                mlp_fused.add(m)
        for m in model.modules():
            attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
            if (type(m).__name__ in LLAMA_LAYERS and type(attn).__name__ in LLAMA_ATTENTIONS
                    and type(mlp).__name__ in LLAMA_MLPS and _swappable(m) and _swappable(attn) and _swappable(mlp)
                    and getattr(attn, "o_proj", None) in calls and getattr(mlp, "down_proj", None) in calls):
                fold = fold_norms and attn in qkv_fused and mlp in mlp_fused and all(
                    _rmsnorm_foldable(n, attn.q_proj.weight) for n in (m.input_layernorm, m.post_attention_layernorm))
                calls[m] = _fused_layer(m, residuals, prenorm if fold else None)
    return _calls_replaced(list(calls), calls.__getitem__)


# The widest input whose norm is folded into the launches after it. Every program of a folded launch re-reads the
# whole input for its sum of squares and normalizes each column it reads: on an H200 that slowed the 8B shape's
# GEMVs (hidden 4096) from 3.75 to 4.24 ms per step, more than the 64 norm launches it saved, while the 135M
# shape's (hidden 576) step went from 0.844 to 0.777 ms (reports/examples/decode_fused_h200.md).
FOLD_MAX_HIDDEN = 1024


def _rmsnorm_foldable(norm, weight: torch.Tensor) -> bool:
    """A norm a fused launch can apply to its input: Llama's formula, a weight of the input's size and dtype, a
    narrow input (FOLD_MAX_HIDDEN)."""
    w = getattr(norm, "weight", None)
    return (type(norm).__name__ in LLAMA_RMSNORMS and hasattr(norm, "variance_epsilon") and w is not None
            and w.dim() == 1 and w.numel() == weight.shape[1] <= FOLD_MAX_HIDDEN and w.dtype == weight.dtype
            and w.is_contiguous() and _swappable(norm))


def _fused_qkv(projs: list, calls: dict, gemv_many, prenorm: dict) -> dict:
    """The calls of a q/k/v trio: the first computes all three, the others take theirs if called on its input
    (a norm handed over for the first, `prenorm`, applies to all three)."""
    first, rest, handed = projs[0], projs[1:], {}

    def first_call(x: torch.Tensor) -> torch.Tensor:
        norm = prenorm.pop(first, None)
        if not _one_token(x):
            return calls[first](x if norm is None else norm(x))
        out = gemv_many(x, [p.weight for p in projs], [p.bias for p in projs] if first.bias is not None else None,
                        **({} if norm is None else {"norm": (norm.weight, norm.variance_epsilon)}))
        handed.update({p: (x, y) for p, y in zip(rest, out[1:])})  # keeps x alive: `is` below cannot be fooled
        return out[0]

    def later(p):
        own = calls[p]

        def call(x: torch.Tensor) -> torch.Tensor:
            got = handed.pop(p, None)
            if got is not None and got[0] is x:
                return got[1]
            norm = prenorm.get(first)  # called before the first: the norm still applies
            return own(x if norm is None else norm(x))
        return call
    return {first: first_call, **{p: later(p) for p in rest}}


def _fused_layer(layer: torch.nn.Module, residuals: dict, prenorm: dict | None):
    """A Llama decoder layer's forward, `h = x + attn(norm1(x)); return h + mlp(norm2(h))`, with each residual
    handed to the linear that ends its branch (attention's o_proj, the MLP's down_proj: each called once, last)
    instead of a separate add: the same roundings, two launches fewer per layer. With `prenorm`, norm1 and norm2
    go to the fused launches that start the branches (q/k/v, the MLP's SiLU(gate) * up): two launches fewer."""
    attn, mlp = layer.self_attn, layer.mlp

    def call(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or not _one_token(hidden_states):
            return layer.forward(hidden_states, *args, **kwargs)
        residuals[attn.o_proj] = hidden_states
        if prenorm is None:
            h, _ = attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        else:  # LLAMA_ATTENTIONS read their input only through q/k/v (and its shape)
            prenorm[attn.q_proj] = layer.input_layernorm
            h, _ = attn(hidden_states=hidden_states, **kwargs)
        residuals[mlp.down_proj] = h
        if prenorm is None:
            return mlp(layer.post_attention_layernorm(h))
        prenorm[mlp] = layer.post_attention_layernorm
        return mlp(h)
    return call


def _fused_mlp(mlp: torch.nn.Module, gemv_silu_mul, prenorm: dict):
    def call(x: torch.Tensor) -> torch.Tensor:
        norm = prenorm.pop(mlp, None)
        if not _one_token(x):
            return mlp.forward(x if norm is None else norm(x))
        return mlp.down_proj(gemv_silu_mul(x, mlp.gate_proj.weight, mlp.up_proj.weight,
                                           **({} if norm is None else {"norm": (norm.weight, norm.variance_epsilon)})))
    return call


def triton_norms(model: torch.nn.Module):
    """While active, every norm of a class in LLAMA_RMSNORMS (a weight over the last dim) runs `rmsnorm_triton`
    on contiguous rows; outside the context the model is untouched."""
    from kvbench.methods.kernels.rmsnorm import MAX_COLS, rmsnorm_triton

    def make_call(norm):
        def call(x: torch.Tensor) -> torch.Tensor:
            if not x.is_contiguous():  # a strided view: transformers' own code
                return norm.forward(x)
            return rmsnorm_triton(x, norm.weight, norm.variance_epsilon)
        return call
    return _calls_replaced([m for m in model.modules() if type(m).__name__ in LLAMA_RMSNORMS
                            and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None
                            and m.weight.dim() == 1 and m.weight.numel() <= MAX_COLS and _swappable(m)], make_call)


_ROPE_OK: dict[object, bool] = {}  # apply_rotary_pos_emb function -> computes rope_ref (checked once)


def _standard_rope(fn) -> bool:
    """Whether a model file's apply_rotary_pos_emb(q, k, cos, sin) is `rope_ref` (checked on a small CPU case:
    a family with interleaved or partial rotary gives other numbers and keeps its own function)."""
    if fn not in _ROPE_OK:
        from kvbench.methods.kernels.rope import rope_ref
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(1, 3, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
        cos, sin = torch.randn(1, 1, 8, generator=g), torch.randn(1, 1, 8, generator=g)
        try:
            got = fn(q, k, cos, sin)
            _ROPE_OK[fn] = all(torch.equal(a, b) for a, b in zip(got, rope_ref(q, k, cos, sin)))
        except Exception:  # noqa: BLE001 - another signature: not ours to replace
            _ROPE_OK[fn] = False
    return _ROPE_OK[fn]


@contextlib.contextmanager
def triton_rope(model: torch.nn.Module):
    """While active, the `apply_rotary_pos_emb` that the model's attention modules call (a global of their
    transformers model file) runs `rope_triton` for one token (batch 1), where that file's function computes
    `rope_ref`; any other call goes to the original. Restored on exit."""
    import sys

    from kvbench.methods.kernels.rope import fits, rope_triton
    files = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__.endswith("Attention")}
    patched = []
    for f in files:
        orig = getattr(f, "apply_rotary_pos_emb", None)
        if orig is None or not _standard_rope(orig):
            continue

        def fused(q, k, cos, sin, unsqueeze_dim=1, _orig=orig, **kw):
            if unsqueeze_dim != 1 or kw or not (fits(q, cos, sin) and fits(k, cos, sin)):
                return _orig(q, k, cos, sin, unsqueeze_dim, **kw)
            return rope_triton(q, k, cos, sin)
        f.apply_rotary_pos_emb = fused
        patched.append((f, orig))
    try:
        yield
    finally:
        for f, orig in patched:
            f.apply_rotary_pos_emb = orig


def decoder_layers(model: torch.nn.Module) -> list:
    """The model's decoder layers (the ModuleList of config.num_hidden_layers blocks)."""
    n = model.config.num_hidden_layers
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return list(m)
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers found")


def _regions(model: torch.nn.Module, backend: str) -> list:
    """(module, compiled call) for every child of every decoder layer but its attention (the MLP, the norms),
    and the final norm; made once per model and backend, kept on the model (freed with it)."""
    regions = model.__dict__.setdefault("_kvbench_regions", {})
    if backend not in regions:
        options = {"coordinate_descent_tuning": True} if backend == "inductor" else None  # see compiled_step
        mods = [child for layer in decoder_layers(model) for name, child in layer.named_children()
                if "attn" not in name and "attention" not in name]
        norm = getattr(getattr(model, "model", None), "norm", None)
        mods += [norm] if isinstance(norm, torch.nn.Module) else []
        regions[backend] = [(m, torch.compile(m._call_impl, backend=backend, options=options)) for m in mods]
    return regions[backend]


def regional(model: torch.nn.Module, backend: str = "inductor"):
    """While active, each decoder layer's modules but attention run compiled (regional compilation, as
    `nn.Module.compile` does it: the module's call goes through torch.compile). Every layer's MLP (and norm)
    runs the same code on parameters of the same shapes, which torch.compile's guards do not tell apart, so
    one graph per module kind and input shape serves all layers: the compile costs about a layer's, not the
    whole step's (which traces every layer and specialises on each layer's index in the cache). Attention and
    the cache ops stay as in the graph path. Outside the context the model is untouched (the prefill, the
    engine loop)."""
    calls = dict(_regions(model, backend))
    return _calls_replaced(list(calls), calls.__getitem__)


def _zero_spare_side(layer: LayerKV) -> None:
    """Side data of rows outside every head (spare capacity; rows left behind by an engine-loop removal) to
    0: the in-place step appends there, and a new row has weight 1 and no score."""
    if not layer.side:
        return
    r = torch.arange(layer.keys.shape[0], device=layer.keys.device).unsqueeze(0)
    owned = ((r >= layer.starts.unsqueeze(1)) & (r < (layer.starts + layer.lengths).unsqueeze(1))).any(0)
    for t in layer.side.values():
        t.masked_fill_(~owned, 0)


class FastDecoder:
    """Greedy decoding of up to `max_new_tokens` on top of a prefilled (and compressed) cache.

    `decode(first_token, max_new_tokens, stop_ids)` has the engine's semantics (`Engine.decode`): the first
    token comes from the prefill logits, every later one costs one forward. `use_graph` defaults to True on
    CUDA. `compile`: False, True (Inductor) or a torch.compile backend name (tests use "aot_eager"): the whole
    step; "regional" or "regional:<backend>": each layer's modules but attention (`regional`).
    `ring` (n_sink, cap) or `evict` (a DecodeEviction): the method's decode-time eviction (see `plan`).
    Call `finish()` afterwards (decode does) so the cache's host-side lengths and `seen_tokens` match.
    """

    @torch.inference_mode()  # the cache's tensors are inference tensors: changed in place here
    def __init__(self, model: torch.nn.Module, cache: KVBenchCache, max_new_tokens: int,
                 use_graph: bool | None = None, warmup_steps: int = 1, compile: bool | str = False,
                 ring: tuple[int, int] | None = None, evict: DecodeEviction | None = None,
                 gemv: str | None = None, norm: str | None = None, rope: str | None = None,
                 fold_norms: bool = True):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; allowed: >= 1")
        dev = next(model.parameters()).device
        self.use_graph = dev.type == "cuda" if use_graph is None else bool(use_graph)
        if self.use_graph and dev.type != "cuda":
            raise ValueError(f"use_graph=True needs a CUDA model, got device {dev}; allowed: use_graph=False on CPU")
        if self.use_graph and attention.DECODE_KERNEL == "ref":
            raise ValueError("use_graph=True needs the Triton decode kernel; allowed: attention.DECODE_KERNEL "
                             "'auto' or 'triton' (the torch reference reads host-side lengths)")
        if any(layer is None for layer in cache.kv):
            raise ValueError("fast decode needs a prefilled cache (every layer holds tokens)")
        if ring is not None and evict is not None:
            raise ValueError("give ring or evict, not both")
        encoded = [layer for layer in cache.kv if not isinstance(layer, LayerKV)]
        if encoded and (ring is not None or evict is not None):
            raise ValueError("a cache of storage formats decodes without decode-time eviction (ring / evict)")
        if not all(getattr(layer, "device_decode", False) for layer in encoded):
            raise ValueError(f"{type(next(l for l in encoded if not l.device_decode)).__name__} has no device step "
                             "(EncodedLayer.device_decode); use the engine loop")
        n_layers = len(cache.kv)
        self.evict = evict
        self.lens0 = cache.head_lengths()
        self.evict_tensors: list[_EvictTensors | None] = [None] * n_layers
        self.committed = 0  # steps whose schedule the method's state has taken (rank "scheduled")
        if ring is not None:  # a rolling window (Method.decode_ring): a head never exceeds cap + 1 rows
            n_sink, cap = ring
            if not ring_fits(cache, ring):
                raise ValueError(f"a head holds more than the window's cap {cap}; allowed: heads of <= cap rows "
                                 "(use the engine loop, or evict=the method's decode_eviction)")
            ring_rows = cap + 1  # the window plus the token being decoded, as the engine loop attends
            _sort_rows_by_position(cache)
            for layer in cache.kv:
                layer.reserve(max(0, max(min(max_new_tokens, ring_rows - n) for n in layer.head_lengths)))
            self.steps_plan = [_LayerStep(ring_rows, n_sink)] * n_layers
            self.first_plan = self.steps_plan
        elif evict is not None:
            self.steps_plan, self.first_plan, self.evict_tensors = self._plan_eviction(cache, evict, max_new_tokens)
        else:
            for layer in cache.kv:  # capacity for every new token: the buffers never move while decoding
                layer.reserve(max_new_tokens) if isinstance(layer, LayerKV) else layer.device_begin(max_new_tokens)
            self.steps_plan = self.first_plan = [_LayerStep(0, 0)] * n_layers
        for layer in cache.kv:
            if isinstance(layer, LayerKV):
                _zero_spare_side(layer)
        # the first step evicts a question on top down to the cap, eagerly (its shapes differ from later steps)
        # (as does a format whose first step differs: MiniCache merges the question on top)
        self.overflow = self.first_plan != self.steps_plan or any(
            getattr(layer, "device_first_step_differs", False) for layer in encoded)
        self.ring_next = [torch.full((layer.n_heads,), self.steps_plan[i].n_sink, dtype=torch.long, device=dev)
                          for i, layer in enumerate(cache.kv)]
        self.model, self.base, self.capacity = model, cache, max_new_tokens
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1, 1), cache.seen_tokens, dtype=torch.long, device=dev)
        self.cache = _InPlaceCache(cache)
        self.warmup_steps = warmup_steps
        # compile: True (Inductor) / a backend: the whole step; "regional" / "regional:<backend>": see `regional`
        self.region = None
        if isinstance(compile, str) and compile.split(":")[0] == "regional":
            self.region = compile.partition(":")[2] or "inductor"
            self.step_fn = _step
        else:
            self.step_fn = compiled_step("inductor" if compile is True else compile) if compile else _step
        self.compiled = bool(compile)
        from kvbench.methods.kernels import HAS_TRITON
        auto = self.use_graph and not compile and HAS_TRITON
        # the Triton kernel in effect per knob ("fused" / "triton"), or None: torch's own ops
        self.gemv = _kernel_mode("gemv", default_gemv() if gemv is None else gemv, GEMV_MODES, compile, auto)
        self.norm = _kernel_mode("norm", default_norm() if norm is None else norm, NORM_MODES, compile, auto)
        self.rope = _kernel_mode("rope", default_rope() if rope is None else rope, ROPE_MODES, compile, auto)
        # with fused linears and Triton norms, a layer's norms go into the fused launches after them (`triton_linears`;
        # fold_norms=False keeps their own launches: an A/B switch for bench/decode_breakdown.py)
        self.fold_norms = fold_norms and self.gemv == "fused" and self.norm is not None
        self.path = "regional compiled graph" if self.region else "compiled graph" if compile else "graph"
        kernels = [k for k, on in (("fused gemv" if self.gemv == "fused" else "gemv", self.gemv),
                                   ("rmsnorm", self.norm), ("rope", self.rope)) if on]
        self.path += f" (triton {', '.join(kernels)})" if kernels else ""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0
        self.setup_steps = 0  # leading steps that also compiled, warmed up or captured (one-time costs)

    @staticmethod
    def _plan_eviction(cache: KVBenchCache, evict: DecodeEviction, max_new_tokens: int):
        """Per layer, the steady step, the first step and the device tensors; reserves each head's rows
        (cap + 1 at most for a head with a cap)."""
        if len(evict.caps) != len(cache.kv):
            raise ValueError(f"evict has caps for {len(evict.caps)} layers, the cache has {len(cache.kv)}")
        steady, first, tensors = [], [], []
        for i, layer in enumerate(cache.kv):
            lens = layer.head_lengths
            caps = head_caps(evict.caps[i], layer.n_heads)
            if (evict.shared or evict.rank == "scheduled") and len(set(lens)) > 1:
                raise ValueError(f"{'shared' if evict.shared else 'scheduled'} eviction needs heads of one length; "
                                 f"layer {i} has {lens}")
            # a head grows to cap + 1 rows during a step and is back to cap after it; one over the cap needs
            # one more row for the first step only
            layer.reserve(max(max_new_tokens if c is None else min(max_new_tokens, c + 1 - n) if n <= c else 1
                              for n, c in zip(lens, caps)))
            if evict.score is not None and evict.score not in layer.side:
                layer.side[evict.score] = torch.zeros(layer.keys.shape[0], device=layer.keys.device)
            capped = [(n, c) for n, c in zip(lens, caps) if c is not None]
            if not capped and evict.score is None:
                steady.append(_LayerStep(0, 0))
                first.append(steady[-1])
                tensors.append(None)
                continue
            width = max((c + 1 for _, c in capped), default=1)
            ev = _Evict(evict.rank, evict.n_sink, evict.recent[i] if evict.recent else 0, evict.shared,
                        evict.score, evict.needs_probs, evict.pool, evict.merge_beta, width=width,
                        repeat=int(bool(capped)))
            steady.append(_LayerStep(0, 0, ev))
            over = max((n + 1 - c for n, c in capped), default=0)
            first.append(_LayerStep(0, 0, ev._replace(width=max(width, max(n for n, _ in capped) + 1), repeat=over))
                         if over > 1 else steady[-1])
            dev = layer.keys.device
            t = _EvictTensors(torch.tensor([NO_CAP if c is None else c for c in caps], device=dev))
            if evict.rank == "scheduled" and capped:
                rows = [step_rows([lens], [caps], k)[0][0] for k in range(max_new_tokens)]
                ranks = [r for step in evict.schedule(i, rows, False) for r in _in_removal_order(step)]
                t = t._replace(ranks=torch.tensor(ranks or [0], device=dev),
                               done=torch.zeros(layer.n_heads, dtype=torch.long, device=dev))
            if evict.merge_tau and capped:
                taus = [float("nan") if x is None else x for x in evict.merge_tau[i]]
                t = t._replace(tau=torch.tensor(taus, dtype=torch.float64, device=dev))
            tensors.append(t)
        return steady, first, tensors

    def _commit_schedule(self) -> None:
        """A scheduled rank: the method's state moves on by the steps taken since the last commit."""
        if self.evict is None or self.evict.schedule is None or self.steps <= self.committed:
            return
        for i, t in enumerate(self.evict_tensors):
            if t is not None and t.ranks is not None:
                caps = head_caps(self.evict.caps[i], len(self.lens0[i]))
                rows = [step_rows([self.lens0[i]], [caps], k)[0][0] for k in range(self.committed, self.steps)]
                self.evict.schedule(i, rows, True)
        self.committed = self.steps

    def _step(self, first: bool = False) -> None:
        plan = self.first_plan if first else self.steps_plan
        state = (self.base.kv, self.pos, self.ring_next, plan, self.evict_tensors)
        step_fn = _step if first else self.step_fn  # the first step over a question runs once: never compiled
        region = regional(self.model, self.region) if self.region and not first else contextlib.nullcontext()
        linears = triton_linears(self.model, self.gemv == "fused", self.fold_norms) if self.gemv \
            else contextlib.nullcontext()
        norms = triton_norms(self.model) if self.norm else contextlib.nullcontext()
        rope = triton_rope(self.model) if self.rope else contextlib.nullcontext()
        with session(self.cache, None, "decode"), attention.inplace_decode(state), region, linears, norms, rope:
            self.logits = step_fn(self.model, self.ids, self.pos, self.cache)

    def _run_one(self) -> None:
        if self.steps >= self.capacity:
            raise ValueError(f"fast decode: step {self.steps + 1} exceeds the reserved capacity {self.capacity}")
        self.steps += 1
        first = self.overflow and self.steps == 1
        if self.graph is None and (self.use_graph or (self.compiled and self.steps == 1 + self.overflow)):
            self.setup_steps += 1
        if not self.use_graph or first:
            return self._step(first)
        if self.graph is not None:
            return self.graph.replay()
        if self.steps <= self.warmup_steps + self.overflow:  # real steps on a side stream: compile, Triton, cuBLAS
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._step()
            torch.cuda.current_stream().wait_stream(s)
            return None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records this step; nothing runs until replay
                self._step()
        except RuntimeError as e:  # capture failed: the cache is untouched, go on eagerly
            self.graph_error = str(e).splitlines()[0]
            self.use_graph = False
            return self._step()
        self.graph = graph
        self.graph.replay()

    @torch.inference_mode()
    def decode(self, first_token: int, max_new_tokens: int, stop_ids=()) -> tuple[list[int], list[float]]:
        """Returns (token ids, wall ms of every forward step incl. reading the token back to the host)."""
        if max_new_tokens > self.capacity:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the reserved capacity {self.capacity}")
        stop = set(stop_ids)
        out, step_ms = [int(first_token)], []
        self.ids.fill_(int(first_token))
        cuda = self.ids.is_cuda
        try:
            # no collection inside a timed step: held off for the whole loop (a replayed step allocates next to
            # nothing), rather than toggled at every step of this hot loop
            with gc_paused(collect=False):
                while out[-1] not in stop and len(out) < max_new_tokens:
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    self._run_one()
                    nxt = int(self.ids)  # the host needs the token (stop check): one sync per step
                    step_ms.append((time.perf_counter() - t0) * 1e3)
                    out.append(nxt)
        finally:
            self.finish()
        return out, step_ms

    def finish(self) -> None:
        """Bring the cache's host-side bookkeeping up to date and release the graph."""
        for layer in self.base.kv:
            if isinstance(layer, LayerKV):
                layer._lens = layer.lengths.tolist()  # the device lengths moved on; the host copies did not
            else:
                layer.device_end()
        self.base.resync_held()  # the in-place steps never told the meter (the engine observes their peak)
        self.base.seen_tokens = int(self.pos)
        self.cache.seen_tokens = self.base.seen_tokens
        self._commit_schedule()
        for i, t in enumerate(self.evict_tensors):  # D2O: the thresholds as the engine loop leaves them
            if t is not None and t.tau is not None:
                self.evict.store_tau(i, [None if math.isnan(x) else x for x in t.tau.tolist()])
        self.graph = None
