"""The full cache's prefill replayed from CUDA graphs: a small model's prefill without per-layer host work.

On a 135M model an 8K prefill is ~15 ms of GPU work, but an eager forward issues ~30 host ops per layer per
module (Python, dispatch, launches): the host, not the GPU, sets the TTFT (transformers' own forward is
host-bound there too). As the decode path does per token (kvbench/fast_decode.py), this path captures the
whole forward once per shape and replays it:
- the context's tokens are right-padded to a bucket of `rows` tokens (padding comes after the real tokens, so
  causal attention leaves every real token's output, key and value unchanged; the padded rows are spare
  capacity afterwards, overwritten by the question and the answer);
- each layer writes its keys, values and positions into a preallocated, zero-initialised store of `cap` rows
  per KV head (a `LayerKV` layout: head h's rows at h * cap), and attends with flash attention over the
  chunk itself (is_causal);
- a question on top (padded to `q_rows`) writes its rows at an offset held in device memory and attends over
  the store's rows through a (q, cap) mask built on the device (row j is visible to question token i iff
  j <= offset + i), so one graph serves every context length of its bucket;
- the logits are those of the last real token (an index in device memory).
The cache then holds `LayerKV`s over the store (no copy): the store is lent to that cache, and a later
prefill replays into it only once no layer of the earlier cache is alive (otherwise it runs eagerly).
Capture (with one eager warm-up run) is a one-time cost per bucket, timed apart (`setup_ms`); at most
`max_slots` buckets (and stores of at most `max_bytes` together) are kept, the least recently used going first. Memory: the store and the graphs' private pool were allocated when captured,
so each replay reports them to the running `PeakMemory` (`metrics.held_elsewhere`): a sample's peak counts
the store, padding included, and the forward's activations as if allocated then.
Only the full cache (nothing to compress), batch 1, one GPU, and models whose attention is plain causal
(no sliding window, no soft cap: those raise inside the capture, which then falls back to the eager path).
On CPU the same static code runs eagerly (use_graph=False): what the tests compare with the engine's prefill.
"""
from __future__ import annotations

import contextlib
import os
import time
import weakref

import torch
import torch.nn.functional as F

from kvbench import attention, fast_decode
from kvbench.cache import KVBenchCache, LayerKV, _uniform_meta
from kvbench.compat import cache_kwargs
from kvbench.metrics import PeakMemory, active_peak_memory, attention_shape, held_elsewhere

MODES = ("auto", "0", "1")
AUTO_MAX_PARAMS = 1_000_000_000  # above this a prefill is GPU-bound: replaying it saves next to nothing


def mode() -> str:
    """KVBENCH_GRAPH_PREFILL=auto|0|1 (default auto: on CUDA, for models under 1B parameters)."""
    v = os.environ.get("KVBENCH_GRAPH_PREFILL", "auto")
    if v not in MODES:
        raise ValueError(f"KVBENCH_GRAPH_PREFILL={v!r}; allowed: {', '.join(MODES)}")
    return v


def compile_mode() -> str | None:
    """KVBENCH_COMPILE_PREFILL=0|regional (default 0): with regional, the static prefill's forward runs each
    decoder layer's modules but attention through torch.compile (`fast_decode.regional`): the element-wise
    work fuses (an 8K prefill of the 135M model on an H200: 19.9 -> 17.8 ms), for a one-time compile of
    ~11 s per process (timed apart, as capture). "regional:<backend>" picks the backend (tests: aot_eager)."""
    v = os.environ.get("KVBENCH_COMPILE_PREFILL", "0")
    if v != "0" and v.split(":")[0] != "regional":
        raise ValueError(f"KVBENCH_COMPILE_PREFILL={v!r}; allowed: 0, regional")
    return None if v == "0" else (v.partition(":")[2] or "inductor")


def wanted(model: torch.nn.Module, devices: list) -> str | None:
    """None if the engine should prefill the full cache through this path, else why not (one line)."""
    m = mode()
    compile_mode()  # a bad value fails here, before any sample
    if m == "0":
        return "KVBENCH_GRAPH_PREFILL=0"
    if len(devices) > 1:
        return f"model spread over {len(devices)} devices"
    if devices[0].type != "cuda":
        return f"{devices[0].type} device"
    if m == "auto" and sum(p.numel() for p in model.parameters()) > AUTO_MAX_PARAMS:
        return "a model over 1B parameters (GPU-bound prefill; KVBENCH_GRAPH_PREFILL=1 forces it)"
    return None


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class _Slot:
    """One bucket: the store of cap rows per KV head for contexts of up to `rows` tokens, its static inputs,
    the context's graph and a graph per question bucket."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, rows: int, cap: int, dtype, dev):
        self.rows, self.cap, self.n_kv, self.dev = rows, cap, n_kv, dev
        with torch.inference_mode():  # the cache's tensors are inference tensors, as the eager prefill's
            # zeros: a masked row is multiplied by probability 0, so its value must be finite
            self.keys = [torch.zeros(n_kv * cap, head_dim, dtype=dtype, device=dev) for _ in range(n_layers)]
            self.values = [torch.zeros(n_kv * cap, head_dim, dtype=dtype, device=dev) for _ in range(n_layers)]
            self.positions = [torch.zeros(n_kv * cap, dtype=torch.long, device=dev) for _ in range(n_layers)]
            self.ids = torch.zeros(1, rows, dtype=torch.long, device=dev)
            self.pos = torch.arange(rows, device=dev)
            self.last = torch.zeros(1, dtype=torch.long, device=dev)
        self.store_bytes = sum(t.numel() * t.element_size() for ts in (self.keys, self.values, self.positions)
                               for t in ts)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.questions: dict[int, _Question] = {}
        self.lent: list[weakref.ref] = []  # the layers of the last cache the store was lent to
        self.peak_bytes = 0  # the store + the forward's transient peak (measured at capture; on CPU the store)

    def busy(self) -> bool:
        """A layer the store was lent to is alive and still holds it (a layer that grew out of it, or was
        repacked, holds new buffers)."""
        return any((l := r()) is not None and l.keys is k for r, k in zip(self.lent, self.keys))

    def owns(self, cache: KVBenchCache) -> bool:
        """The cache's layers are this store's (so a question graph may write into it)."""
        return all(isinstance(l, LayerKV) and l.keys is k for l, k in zip(cache.kv, self.keys))


class _Question:
    """Static inputs and graph of a question of up to `rows` tokens fed on top of a slot's context."""

    def __init__(self, rows: int, cap: int, dev):
        self.rows = rows
        with torch.inference_mode():
            self.ids = torch.zeros(1, rows, dtype=torch.long, device=dev)
            self.pos = torch.zeros(rows, dtype=torch.long, device=dev)    # the tokens' positions
            self.at = torch.zeros(rows, dtype=torch.long, device=dev)     # the rows they go to (in every head)
            self.last = torch.zeros(1, dtype=torch.long, device=dev)
            self.mask = torch.zeros(rows, cap, dtype=torch.bool, device=dev)
            self.cols = torch.arange(cap, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.peak_bytes = 0


class GraphPrefill:
    """Per engine: buckets (`_Slot`s) of the full cache's static prefill. `why_not_context` / `why_not_question`
    say whether a prefill can take it, `prepare_context` / `prepare_question` capture what is new (its time:
    `last_setup_ms`, a one-time cost the caller keeps out of its clock), `context()` / `question()` replay and
    return the last token's logits (None: the model's attention is not plain causal; the caller goes eager)."""

    def __init__(self, model: torch.nn.Module, use_graph: bool | None = None, rows: int = 256, q_rows: int = 32,
                 max_slots: int = 8, max_bytes: int = 4 << 30, compile: str | None | bool = True):
        self.model = model
        # compile: a torch.compile backend for each layer's modules but attention (`compile_mode`); True: the
        # environment's choice (KVBENCH_COMPILE_PREFILL), None / False: none
        self.compile = compile_mode() if compile is True else (compile or None)
        self.n_layers = model.config.num_hidden_layers
        self.n_kv, _, self.head_dim = attention_shape(model.config)
        p = next(model.parameters())
        self.dev, self.dtype = p.device, p.dtype
        self.use_graph = self.dev.type == "cuda" if use_graph is None else bool(use_graph)
        if self.use_graph and self.dev.type != "cuda":
            raise ValueError(f"use_graph=True needs a CUDA model, got device {self.dev}; allowed: use_graph=False")
        self.rows, self.q_rows, self.max_slots, self.max_bytes = rows, q_rows, max_slots, max_bytes
        self.slots: dict[tuple[int, int], _Slot] = {}   # (rows, cap) -> slot, oldest first
        self.pool = torch.cuda.graph_pool_handle() if self.use_graph else None  # one pool for every graph
        self.unsupported: str | None = None  # set when a capture failed: every later call runs eagerly
        self.last_setup_ms = 0.0
        # the decode step's Triton RMSNorm and RoPE (whole rows, a whole context's tokens) where its knobs allow
        # them (KVBENCH_DECODE_NORM / _ROPE: auto on CUDA) and the forward is not compiled: transformers' ~7 + ~10
        # element-wise kernels per layer over every token become 2 + 1 (H200, 135M shape, 8K: reports/examples/
        # prefill_small_model_h200.md)
        from kvbench.methods.kernels import HAS_TRITON
        auto = self.use_graph and not self.compile and HAS_TRITON
        knobs = (("rmsnorm", "norm", fast_decode.default_norm(), fast_decode.NORM_MODES),
                 ("rope", "rope", fast_decode.default_rope(), fast_decode.ROPE_MODES))
        self.kernels = [k for k, knob, mode, modes in knobs
                        if not self.compile and fast_decode._kernel_mode(knob, mode, modes, False, auto)]
        self.path = "graph" + (f" (triton {', '.join(self.kernels)})" if self.kernels else "")

    # -- the forward ------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor, attend) -> torch.Tensor:
        # transformers' view of the cache: update() stores nothing (the attention above writes the store), and the
        # mask sizes are constants of the captured shape (kvbench's attention ignores transformers' mask)
        cache = fast_decode._InPlaceCache(KVBenchCache(self.n_layers))
        region = fast_decode.regional(self.model, self.compile) if self.compile else contextlib.nullcontext()
        norms = fast_decode.triton_norms(self.model) if "rmsnorm" in self.kernels else contextlib.nullcontext()
        rope = fast_decode.triton_rope(self.model) if "rope" in self.kernels else contextlib.nullcontext()
        with attention.inplace_prefill(attend), region, norms, rope:
            out = self.model(input_ids=ids, **cache_kwargs(self.model, cache, pos), use_cache=True,
                             logits_to_keep=last)
        return out.logits[0, -1]

    def _context_attention(self, slot: _Slot):
        def attend(module, query, key, value, scaling, window, softcap):
            _plain(window, softcap)
            i, (_, h, n, d) = module.layer_idx, key.shape
            slot.keys[i].view(h, slot.cap, d)[:, :n] = key[0]
            slot.values[i].view(h, slot.cap, d)[:, :n] = value[0]
            slot.positions[i].view(h, slot.cap)[:, :n] = slot.pos
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=query.shape[1] != h)
            return out.transpose(1, 2), None
        return attend

    def _question_attention(self, slot: _Slot, q: _Question):
        def attend(module, query, key, value, scaling, window, softcap):
            _plain(window, softcap)
            i, (_, h, n, d) = module.layer_idx, key.shape
            keys = slot.keys[i].view(h, slot.cap, d)
            values = slot.values[i].view(h, slot.cap, d)
            keys.index_copy_(1, q.at, key[0])
            values.index_copy_(1, q.at, value[0])
            slot.positions[i].view(h, slot.cap).index_copy_(1, q.at, q.pos.expand(h, n))
            # memory-efficient attention with a mask. On an H200, 64 tokens over 8448 rows per layer: 129 us (fp32
            # matmuls 115 us, a KV head's query heads as rows of one mask 141 us): latency-bound, a few programs
            # walk every row; a split-K kernel over the rows is what would make it fast
            out = F.scaled_dot_product_attention(query, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=q.mask,
                                                 scale=scaling, enable_gqa=query.shape[1] != h)
            return out.transpose(1, 2), None
        return attend

    def _run_context(self, slot: _Slot) -> torch.Tensor:
        return self._forward(slot.ids, slot.pos, slot.last, self._context_attention(slot))

    def _run_question(self, slot: _Slot, q: _Question) -> torch.Tensor:
        torch.le(q.cols.unsqueeze(0), q.at.unsqueeze(1), out=q.mask)  # row j visible to token i: j <= its row
        return self._forward(q.ids, q.pos, q.last, self._question_attention(slot, q))

    # -- capture ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _capture(self, run) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None, int]:
        """(graph, its logits output, the forward's transient peak in bytes). Two eager runs on a side stream
        first (Triton/cuBLAS/cuDNN set-up, never inside a capture; the second one's peak is the forward's
        activations, without the first's one-time workspaces), then the capture. Not on CPU."""
        if not self.use_graph:
            return None, None, 0
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
            with PeakMemory(self.dev) as pm:
                run()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        torch.cuda.synchronize(self.dev)
        return graph, logits, pm.peak

    @staticmethod
    def _set_up():
        """A bucket's store and graphs are allocated once and reused by later samples, so they stay out of the
        running sample's peak growth here; every replay reports them instead (`held_elsewhere`)."""
        outer = active_peak_memory()
        return outer.uncounted() if outer is not None else contextlib.nullcontext()

    def _slot(self, n: int, spare: int) -> tuple[_Slot | None, bool]:
        """The bucket of a context of n tokens with `spare` rows per head after it, and whether it was captured
        now (None: the capture failed)."""
        rows = round_up(n, self.rows)
        cap = round_up(n + spare + self.q_rows, self.rows)  # the question's padded rows fit in any case
        key = (rows, cap)
        slot = self.slots.pop(key, None)
        new = slot is None
        if new:
            # the least recently used buckets go first (a lent store lives on with its cache)
            need = self.n_layers * self.n_kv * cap * (2 * self.head_dim * self.dtype.itemsize + 8)  # = store_bytes
            while self.slots and (len(self.slots) >= self.max_slots or
                                  need + sum(s.store_bytes for s in self.slots.values()) > self.max_bytes):
                self.slots.pop(next(iter(self.slots)))
            with self._set_up():
                slot = _Slot(self.n_layers, self.n_kv, self.head_dim, rows, cap, self.dtype, self.dev)
                self._fill_context(slot, [0] * n)
                try:
                    slot.graph, slot.logits, act = self._capture(lambda: self._run_context(slot))
                except (RuntimeError, ValueError) as e:  # a model this static forward cannot run: eager from now on
                    self.unsupported = str(e).splitlines()[0]
                    return None, True
            slot.peak_bytes = slot.store_bytes + act
        self.slots[key] = slot  # most recently used last
        return slot, new

    # -- the public calls -------------------------------------------------------------------------------
    def failure(self) -> str | None:
        """Why this model cannot take the static prefill (a capture or an eager run refused it), or None."""
        return f"static prefill unsupported: {self.unsupported}" if self.unsupported else None

    def why_not_context(self, cache: KVBenchCache, n: int) -> str | None:
        if self.unsupported is not None:
            return self.failure()
        if any(l is not None for l in cache.kv):
            return "the cache is not empty"
        if n < 1:
            return "nothing to prefill"
        return None

    @torch.inference_mode()
    def prepare_context(self, n: int, spare: int) -> _Slot | None:
        """The slot a context of n tokens (and `spare` rows per head after it) replays into, captured now if
        it is new (the time it took: `last_setup_ms`), or None (its store is still lent to a live cache, or
        the capture failed)."""
        t0 = time.perf_counter()
        slot, new = self._slot(n, spare)
        self.last_setup_ms = (time.perf_counter() - t0) * 1e3 if new and self.use_graph else 0.0
        return None if slot is None or slot.busy() else slot

    def _fill_context(self, slot: _Slot, ids: list[int]) -> None:
        n = len(ids)
        slot.ids.copy_(torch.tensor([ids + [0] * (slot.rows - n)]))  # one host-to-device copy
        slot.last.fill_(n - 1)

    @torch.inference_mode()
    def context(self, slot: _Slot, cache: KVBenchCache, ids: list[int]) -> torch.Tensor | None:
        """Prefill `ids` into an empty cache through the slot: the cache's layers become views of its store.
        None (the cache untouched) if the model's attention is not plain causal (eager runs only)."""
        n = len(ids)
        self._fill_context(slot, ids)
        if slot.graph is not None:
            slot.graph.replay()
            logits = slot.logits.clone()  # the pool is shared with the question graphs
        else:
            try:
                logits = self._run_context(slot)
            except ValueError as e:
                self.unsupported = str(e).splitlines()[0]
                return None
        h, cap = self.n_kv, slot.cap
        host = ([i * cap for i in range(h)], [n] * h, [cap] * h)
        for i in range(self.n_layers):
            layer = LayerKV(slot.keys[i], slot.values[i], slot.positions[i], *_uniform_meta(h, n, cap, self.dev),
                            host=host)
            layer.meter = cache.held
            cache.kv[i] = layer
            cache.held.add(layer.nbytes())
        slot.lent = [weakref.ref(l) for l in cache.kv]
        cache.seen_tokens = n
        held_elsewhere(slot.peak_bytes)  # the store and the forward's activations, allocated at capture
        return logits

    def why_not_question(self, cache: KVBenchCache, n: int) -> tuple[str | None, _Slot | None]:
        if self.unsupported is not None:
            return self.failure(), None
        slot = next((s for s in self.slots.values() if s.owns(cache)), None)
        if slot is None:
            return "the cache's layers are not a static store", None
        lens = {L for l in cache.kv for L in l.head_lengths}
        if len(lens) != 1:
            return "heads of different lengths", None
        if lens.pop() + round_up(n, self.q_rows) > slot.cap:
            return f"{n} tokens do not fit the store's spare rows", None
        return None, slot

    @torch.inference_mode()
    def prepare_question(self, slot: _Slot, n: int, cache: KVBenchCache) -> _Question | None:
        """The slot's graph for a question of n tokens on top of `cache` (captured now if new: `last_setup_ms`),
        or None (the capture failed)."""
        t0 = time.perf_counter()
        rows = round_up(n, self.q_rows)
        q = slot.questions.get(rows)
        self.last_setup_ms = 0.0
        if q is None:
            with self._set_up():
                q = slot.questions[rows] = _Question(rows, slot.cap, self.dev)
                # the capture's warm-up run writes the rows the question will write (spare rows: why_not_question)
                L = cache.kv[0].head_lengths[0]
                self._fill_question(q, [0] * n, L, cache.seen_tokens)
                try:
                    q.graph, q.logits, q.peak_bytes = self._capture(lambda: self._run_question(slot, q))
                except (RuntimeError, ValueError) as e:
                    self.unsupported = str(e).splitlines()[0]
                    del slot.questions[rows]
                    return None
            self.last_setup_ms = (time.perf_counter() - t0) * 1e3 if q.graph is not None else 0.0
        return q

    def _fill_question(self, q: _Question, ids: list[int], row: int, pos: int) -> None:
        n = len(ids)
        q.ids.copy_(torch.tensor([ids + [0] * (q.rows - n)]))
        torch.arange(pos, pos + q.rows, out=q.pos)
        torch.arange(row, row + q.rows, out=q.at)
        q.last.fill_(n - 1)

    @torch.inference_mode()
    def question(self, slot: _Slot, q: _Question, cache: KVBenchCache, ids: list[int]) -> torch.Tensor:
        """Feed `ids` on top of a cache whose layers are the slot's store (`why_not_question` said so)."""
        n, L = len(ids), cache.kv[0].head_lengths[0]
        self._fill_question(q, ids, L, cache.seen_tokens)  # its padding lands in spare rows, after its tokens
        if q.graph is not None:
            q.graph.replay()
            logits = q.logits.clone()
        else:
            logits = self._run_question(slot, q)
        h, cap = self.n_kv, slot.cap
        host = ([i * cap for i in range(h)], [L + n] * h, [cap] * h)
        for layer in cache.kv:
            layer.starts, layer.lengths, layer.caps = _uniform_meta(h, L + n, cap, self.dev)
            layer._starts, layer._lens, layer._caps = (list(x) for x in host)
            layer._held(n * h)
        cache.seen_tokens += n
        held_elsewhere(q.peak_bytes)
        return logits


def _plain(window, softcap) -> None:
    if window is not None or softcap is not None:
        raise ValueError("the static prefill computes plain causal attention (no sliding window, no soft cap)")
