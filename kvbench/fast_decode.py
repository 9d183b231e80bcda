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
Qualify (`supports`): methods without decode-time hooks (full, snapkv, pyramidkv, adakv, ...) and methods
whose decode-time eviction is a rolling window (StreamingLLM, recent: `Method.decode_ring`, run as a ring
buffer by the append kernel); methods that score while decoding (H2O, TOVA) keep the eager engine loop. On CPU this runs the same
in-place step eagerly (use_graph=False), which is what the tests compare with the engine loop.
"""
from __future__ import annotations

import os
import time

import torch

from kvbench import attention
from kvbench.attention import session
from kvbench.cache import KVBenchCache
from kvbench.compat import cache_kwargs
from kvbench.method import Method


def supports(method: Method | None) -> bool:
    """True when the method does nothing at decode time (its hooks would not run inside a graph), or only
    rolls a window (`Method.decode_ring`: run here as a ring buffer on the device)."""
    if method is None:
        return True
    if method.needs_decode_probs:
        return False
    return type(method).on_decode is Method.on_decode or method.decode_ring() is not None


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
                            window: int = 0, log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Append one token (k_new, v_new: (h, d); pos: (1,)) to every KV head's reserved spare row (or, with
    ring_rows > 0, over its oldest non-sink row once it holds ring_rows: see methods/kernels/append.py), then
    attend with q (n_q, d) over each head's rows. Returns (n_q, d). Capacity is the caller's promise.
    softcap / window (0: none): Gemma-2's score soft cap and a sliding window of positions (the new token is
    at `pos`), as kvbench.attention.attend. log_weight (T,): per-row logit bias of merged rows (RazorAttention's
    compensation token); the appended rows' entries are 0 already (spare rows are zero-filled by reserve)."""
    from kvbench.methods import kernels
    args = (k_new, v_new, pos, keys, values, positions, starts, lengths)
    opts = dict(softcap=softcap or None, window=window or None, positions=positions, q_pos=pos,
                log_weight=log_weight)
    if attention._decode_kernel(q) == "triton":
        kernels.ragged_append_triton(*args, ring_next=ring_next, ring_rows=ring_rows, n_sink=n_sink)
        return kernels.ragged_decode_attention_triton(q, keys, values, starts, lengths, scaling, **opts)
    kernels.ragged_append_ref(*args, ring_next=ring_next, ring_rows=ring_rows, n_sink=n_sink)
    return kernels.ragged_decode_attention_ref(q, keys, values, starts, lengths, scaling, **opts)


@append_decode_attention.register_fake
def _(q, k_new, v_new, pos, keys, values, positions, starts, lengths, ring_next, ring_rows, n_sink, scaling,
      softcap=0.0, window=0, log_weight=None):
    return torch.empty_like(q)


def inplace_attention(module, query, key, value, state, scaling, window=None, softcap=None):
    """The attention function's fast path (kvbench/attention.py routes here while a FastDecoder runs)."""
    if query.shape[0] != 1 or query.shape[2] != 1:
        raise ValueError(f"fast decode feeds one token at batch 1, got query shape {tuple(query.shape)}")
    layers, pos, ring_next, ring_rows, n_sink = state
    i = module.layer_idx
    layer = layers[i]
    out = append_decode_attention(query[0, :, 0], key[0, :, 0], value[0, :, 0], pos.view(1), layer.keys,
                                  layer.values, layer.positions, layer.starts, layer.lengths, ring_next[i],
                                  ring_rows, n_sink, scaling, float(softcap or 0.0), int(window or 0),
                                  layer.side.get("log_weight"))
    return out.view(1, 1, *out.shape), None  # (1, q=1, n_q, d) as transformers expects


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


def default_compile() -> bool:
    """KVBENCH_COMPILE_DECODE=1|0 (default 0): the engine's GPU decode path compiles its step."""
    v = os.environ.get("KVBENCH_COMPILE_DECODE", "0")
    if v not in ("0", "1"):
        raise ValueError(f"KVBENCH_COMPILE_DECODE={v!r}; allowed: 0, 1")
    return v == "1"


class FastDecoder:
    """Greedy decoding of up to `max_new_tokens` on top of a prefilled (and compressed) cache.

    `decode(first_token, max_new_tokens, stop_ids)` has the engine's semantics (`Engine.decode`): the first
    token comes from the prefill logits, every later one costs one forward. `use_graph` defaults to True on
    CUDA. `compile`: False, True (Inductor) or a torch.compile backend name (tests use "aot_eager").
    Call `finish()` afterwards (decode does) so the cache's host-side lengths and `seen_tokens` match.
    """

    def __init__(self, model: torch.nn.Module, cache: KVBenchCache, max_new_tokens: int,
                 use_graph: bool | None = None, warmup_steps: int = 1, compile: bool | str = False,
                 ring: tuple[int, int] | None = None):
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
        n_sink, ring_rows = 0, 0
        if ring is not None:  # a rolling window (Method.decode_ring): a head never exceeds cap + 1 rows
            n_sink, cap = ring
            if not ring_fits(cache, ring):
                raise ValueError(f"a head holds more than the window's cap {cap}; allowed: heads of <= cap rows "
                                 "(use the engine loop)")
            ring_rows = cap + 1  # the window plus the token being decoded, as the engine loop attends
            _sort_rows_by_position(cache)
            for layer in cache.kv:
                layer.reserve(max(0, max(min(max_new_tokens, ring_rows - n) for n in layer.head_lengths)))
        else:
            cache.reserve(max_new_tokens)  # capacity for every new token: the buffers never move while decoding
        self.ring_rows, self.n_sink = ring_rows, n_sink
        self.ring_next = [torch.full((layer.n_heads,), n_sink, dtype=torch.long, device=dev) for layer in cache.kv]
        self.model, self.base, self.capacity = model, cache, max_new_tokens
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1, 1), cache.seen_tokens, dtype=torch.long, device=dev)
        self.cache = _InPlaceCache(cache)
        self.warmup_steps = warmup_steps
        self.step_fn = compiled_step("inductor" if compile is True else compile) if compile else _step
        self.compiled = bool(compile)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0
        self.setup_steps = 0  # leading steps that also compiled, warmed up or captured (one-time costs)

    def _step(self) -> None:
        state = (self.base.kv, self.pos, self.ring_next, self.ring_rows, self.n_sink)
        with session(self.cache, None, "decode"), attention.inplace_decode(state):
            self.logits = self.step_fn(self.model, self.ids, self.pos, self.cache)

    def _run_one(self) -> None:
        if self.steps >= self.capacity:
            raise ValueError(f"fast decode: step {self.steps + 1} exceeds the reserved capacity {self.capacity}")
        self.steps += 1
        if self.graph is None and (self.use_graph or (self.compiled and self.steps == 1)):
            self.setup_steps += 1
        if not self.use_graph:
            return self._step()
        if self.graph is not None:
            return self.graph.replay()
        if self.steps <= self.warmup_steps:  # real steps on a side stream: compile, Triton, cuBLAS initialise
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
            layer._lens = layer.lengths.tolist()  # the device lengths moved on; the host copies did not
        self.base.seen_tokens = int(self.pos)
        self.cache.seen_tokens = self.base.seen_tokens
        self.graph = None
