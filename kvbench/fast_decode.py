"""Static-shape greedy decoding over the ragged KV cache, replayed from a CUDA graph on the GPU.

At batch 1 a decode step of an 8B model is memory-bound: it should cost about (weight bytes + KV bytes) /
memory bandwidth (~5 ms on an H100). The eager engine loop adds host work per layer (Python, hundreds of
kernel launches, syncs), which at this size costs as much as the step itself. This path removes it:
1. every head gets capacity for all new tokens up front (`KVBenchCache.reserve`), so no buffer moves;
2. a step writes the new key/value rows at `starts + lengths` and bumps `lengths` in place, on the device;
3. attention is the Triton split-K kernel (kvbench/attention.py), which reads the lengths from device memory;
4. so the whole step, the greedy argmax and the position increment included, is captured once with
   `torch.cuda.graph` and replayed for every later token (PyTorch's CUDA graphs; the same trick as
   transformers' static cache + "reduce-overhead" compile, without compiling).
Only methods without decode-time hooks qualify (`supports`): full, snapkv, pyramidkv, adakv, ...; methods
that evict while decoding (H2O, StreamingLLM, TOVA) keep the eager engine loop. On CPU this runs the same
in-place step eagerly (use_graph=False), which is what the tests compare with the engine loop.
"""
from __future__ import annotations

import time

import torch

from kvbench.attention import session
from kvbench.cache import KVBenchCache
from kvbench.method import Method


def supports(method: Method | None) -> bool:
    """True when the method does nothing at decode time (its hooks would not run inside a graph)."""
    return method is None or (type(method).on_decode is Method.on_decode and not method.needs_decode_probs)


class _InPlaceCache(KVBenchCache):
    """Shares the layers of a reserved KVBenchCache; `update` appends one token without reallocating and
    without host syncs (the host copies of the lengths are refreshed by `FastDecoder.finish`)."""

    def __init__(self, base: KVBenchCache, pos: torch.Tensor):
        super().__init__(len(base.kv))
        self.kv = base.kv
        self.seen_tokens = base.seen_tokens
        self._pos = pos  # (1, 1) original position of the token being decoded

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if key_states.shape[0] != 1 or key_states.shape[2] != 1:
            raise ValueError(f"fast decode feeds one token at batch 1, got key shape {tuple(key_states.shape)}")
        layer = self.kv[layer_idx]
        rows = layer.starts + layer.lengths  # (h,): the first free row of every head
        layer.keys.index_copy_(0, rows, key_states[0, :, 0].to(layer.keys.dtype))
        layer.values.index_copy_(0, rows, value_states[0, :, 0].to(layer.values.dtype))
        layer.positions.index_copy_(0, rows, self._pos.view(1).expand(layer.n_heads))
        layer.lengths.add_(1)
        layer._lens = [n + 1 for n in layer._lens]  # host mirror for the CPU reference (stale under a graph)
        return key_states, value_states

    def get_mask_sizes(self, query_length, layer_idx=0):
        # transformers may pass the cache positions (a tensor): int() of it would sync inside the capture
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seen_tokens + q, 0


class FastDecoder:
    """Greedy decoding of up to `max_new_tokens` on top of a prefilled (and compressed) cache.

    `decode(first_token, max_new_tokens, stop_ids)` has the engine's semantics (`Engine.decode`): the first
    token comes from the prefill logits, every later one costs one forward. `use_graph` defaults to True on
    CUDA. Call `finish()` afterwards (decode does) so the cache's host-side lengths and `seen_tokens` match.
    """

    def __init__(self, model: torch.nn.Module, cache: KVBenchCache, max_new_tokens: int,
                 use_graph: bool | None = None, warmup_steps: int = 1):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; allowed: >= 1")
        dev = next(model.parameters()).device
        self.use_graph = dev.type == "cuda" if use_graph is None else bool(use_graph)
        if self.use_graph and dev.type != "cuda":
            raise ValueError(f"use_graph=True needs a CUDA model, got device {dev}; allowed: use_graph=False on CPU")
        from kvbench import attention
        if self.use_graph and attention.DECODE_KERNEL == "ref":
            raise ValueError("use_graph=True needs the Triton decode kernel; allowed: attention.DECODE_KERNEL "
                             "'auto' or 'triton' (the torch reference reads host-side lengths)")
        if any(layer is None for layer in cache.kv):
            raise ValueError("fast decode needs a prefilled cache (every layer holds tokens)")
        cache.reserve(max_new_tokens)  # capacity for every new token: the buffers never move while decoding
        self.model, self.base, self.capacity = model, cache, max_new_tokens
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1, 1), cache.seen_tokens, dtype=torch.long, device=dev)
        self.cache = _InPlaceCache(cache, self.pos)
        self.warmup_steps = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0

    def _step(self) -> None:
        with session(self.cache, None, "decode"):
            out = self.model(input_ids=self.ids, position_ids=self.pos, cache_position=self.pos[0],
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[0, -1]
        self.ids.copy_(out.logits[:, -1:].argmax(-1))  # greedy, on the device: no sync inside the step
        self.pos.add_(1)

    def _run_one(self) -> None:
        if self.steps >= self.capacity:
            raise ValueError(f"fast decode: step {self.steps + 1} exceeds the reserved capacity {self.capacity}")
        self.steps += 1
        if not self.use_graph:
            return self._step()
        if self.graph is not None:
            return self.graph.replay()
        if self.steps <= self.warmup_steps:  # real steps on a side stream: Triton compiles, cuBLAS initialises
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
            layer._lens = layer.lengths.tolist()
        self.base.seen_tokens = int(self.pos)
        self.cache.seen_tokens = self.base.seen_tokens
        self.graph = None
