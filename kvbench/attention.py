"""The attention function registered with transformers' AttentionInterface as "kvbench".

transformers calls it once per layer with post-RoPE `query` (1, n_q, q, d); the layer's new keys/values have
already been appended to the `KVBenchCache` by `cache.update()`. We attend over the layer's whole ragged
cache ourselves (exact attention, causal among the new tokens), then hand the method what it needs:
during prefill `observe_prefill`/`compress_layer`, during decoding `on_decode`.
The engine says which cache/method/phase is active through `session(...)`.

GPU path: a decode step (one new token) runs the Triton split-K kernel `ragged_decode_attention`
(methods/kernels/ragged_decode.py) over the ragged or uniform cache; it reads each head's length from device
memory, so it never syncs with the host and can be captured in a CUDA graph (kvbench/fast_decode.py). A
fresh prefill (queries = all keys) uses SDPA with `is_causal=True` (flash attention) instead of an explicit
mask. The CPU path is the torch reference below, unchanged. `DECODE_KERNEL` picks the decode path:
"auto" (Triton on CUDA), "ref" (torch reference everywhere) or "triton" (also CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvbench.cache import KVBenchCache, LayerKV
from kvbench.method import LayerContext, Method

_state = threading.local()

DECODE_KERNELS = ("auto", "ref", "triton")
DECODE_KERNEL = "auto"


@dataclass
class Session:
    cache: KVBenchCache
    method: Method | None
    phase: str                  # "prefill" (observe, then compress on the last chunk), "extend" (no compression), "decode"
    is_last_chunk: bool = True
    compress_s: float = 0.0     # time spent inside method hooks (seconds), see hook_seconds()
    events: list = field(default_factory=list)  # CUDA: (start, end) events around each prefill hook

    def hook_seconds(self) -> float:
        """Time spent in the method's hooks so far. On the GPU a prefill hook is timed by CUDA events on the
        stream (what it adds to the GPU's timeline, host stalls included), never by syncing: a sync per
        layer would itself stall the GPU and inflate the TTFT it is meant to explain. Waits for the events."""
        if self.events:
            self.events[-1][1].synchronize()
            self.compress_s += sum(a.elapsed_time(b) for a, b in self.events) * 1e-3
            self.events.clear()
        return self.compress_s


@contextlib.contextmanager
def session(cache: KVBenchCache, method: Method | None, phase: str, is_last_chunk: bool = True):
    prev = getattr(_state, "s", None)
    _state.s = Session(cache, method, phase, is_last_chunk)
    try:
        yield _state.s
    finally:
        _state.s = prev


_INPLACE: tuple | None = None  # kvbench.fast_decode's state while it steps


@contextlib.contextmanager
def inplace_decode(state: tuple):
    """While active, every attention call is one in-place decode step (kvbench/fast_decode.py): a plain
    module global rather than the thread-local session, so torch.compile can trace through it."""
    global _INPLACE
    prev, _INPLACE = _INPLACE, state
    try:
        yield
    finally:
        _INPLACE = prev


def _causal_mask(q_len: int, L: int, device) -> torch.Tensor | None:
    """Boolean (q_len, L) mask: the q_len new tokens are the last q_len keys."""
    if q_len == 1:
        return None
    qpos = torch.arange(L - q_len, L, device=device).view(q_len, 1)
    return torch.arange(L, device=device).view(1, L) <= qpos


def attend(query: torch.Tensor, layer: LayerKV, scaling: float, need_probs: bool = False):
    """Exact attention of query (n_q, q, d) over the layer's cache. Returns (out (n_q, q, d), probs or None).

    probs (decode only): per KV head, the new token's attention over that head's rows summed over the group.
    """
    n_q, q_len, d = query.shape
    h = layer.n_heads
    g = n_q // h
    if q_len == 1 and _decode_kernel(query) == "triton":
        return _attend_decode_triton(query, layer, scaling, need_probs)
    if layer.is_uniform():
        k, v, _ = layer.dense()
        L = k.shape[1]
        if query.is_cuda and q_len == L and q_len > 1 and not need_probs:
            # a fresh prefill: causal over a square score matrix, so flash attention needs no mask tensor
            out = F.scaled_dot_product_attention(query.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                                 is_causal=True, scale=scaling, enable_gqa=g > 1)[0]
            return out, None
        if need_probs:
            qg = query.view(h, g * q_len, d)
            p = torch.softmax((qg.float() @ k.float().transpose(1, 2)) * scaling, dim=-1)
            out = (p.to(v.dtype) @ v).view(n_q, q_len, d)
            return out, list(p.view(h, g, q_len, L).sum(dim=(1, 2)).unbind(0))
        mask = _causal_mask(q_len, L, query.device)
        out = F.scaled_dot_product_attention(query.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                             attn_mask=mask, scale=scaling, enable_gqa=g > 1)[0]
        return out, None
    # ragged: each KV head on its own (the torch reference; the GPU path uses the Triton kernel)
    outs, probs = [], []
    for j in range(h):
        k, v, _ = layer.head(j)
        qj = query[j * g:(j + 1) * g]  # (g, q, d)
        L = k.shape[0]
        if need_probs:
            p = torch.softmax((qj.float() @ k.float().T) * scaling, dim=-1)  # (g, q, L)
            outs.append(p.to(v.dtype) @ v)
            probs.append(p.sum(dim=(0, 1)))
        else:
            mask = _causal_mask(q_len, L, query.device)
            outs.append(F.scaled_dot_product_attention(qj, k.unsqueeze(0).expand(g, L, d), v.unsqueeze(0).expand(g, L, d),
                                                       attn_mask=mask, scale=scaling))
    return torch.cat(outs, 0), (probs if need_probs else None)


def _decode_kernel(query: torch.Tensor) -> str:
    if DECODE_KERNEL not in DECODE_KERNELS:
        raise ValueError(f"DECODE_KERNEL={DECODE_KERNEL!r}; allowed: {', '.join(DECODE_KERNELS)}")
    if DECODE_KERNEL != "auto":
        return DECODE_KERNEL
    from kvbench.methods.kernels import use_triton
    return "triton" if use_triton(query) else "ref"


def _attend_decode_triton(query: torch.Tensor, layer: LayerKV, scaling: float, need_probs: bool):
    """One new token over the whole cache with the Triton kernel (same results as the reference above).

    Only device tensors are read (keys, values, starts, lengths), never the host copies of the lengths,
    so this is safe inside a CUDA graph; the per-head split of `probs` uses the host copies (eager only)."""
    from kvbench.methods.kernels import ragged_decode_attention_triton
    res = ragged_decode_attention_triton(query[:, 0], layer.keys, layer.values, layer.starts, layer.lengths,
                                         scaling, return_probs=need_probs)
    if not need_probs:
        return res.unsqueeze(1), None
    out, flat = res
    probs = [flat[s:s + n] for s, n in zip(layer._starts, layer._lens)]
    return out.unsqueeze(1), probs


def kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _INPLACE is not None:
        from kvbench.fast_decode import inplace_attention
        return inplace_attention(module, query, key, value, _INPLACE, scaling)
    s: Session | None = getattr(_state, "s", None)
    if s is None:
        raise RuntimeError("kvbench attention called outside an engine session (use kvbench.engine)")
    if query.shape[0] != 1:
        raise ValueError("kvbench runs batch size 1 (one sample at a time)")
    layer_idx = module.layer_idx
    layer = s.cache.layer(layer_idx)
    q = query[0]
    method = s.method
    need_probs = s.phase == "decode" and method is not None and method.needs_decode_probs
    out, probs = attend(q, layer, scaling, need_probs)
    if method is not None:
        # a host clock around a prefill hook on the GPU would absorb queued attention work (measured on an
        # H100 at 32K: 541 ms vs a true TTFT overhead of 66 ms), and syncing around it stalls the GPU: events
        events = q.is_cuda and s.phase != "decode"
        if events:
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        ctx = LayerContext(layer_idx, len(s.cache), q, layer, scaling, module, s.is_last_chunk, probs)
        if s.phase in ("prefill", "extend"):
            method.observe_prefill(ctx)  # accumulating scorers also see tokens fed after compression
            if s.phase == "prefill" and s.is_last_chunk:
                method.compress_layer(ctx)
        else:
            method.on_decode(ctx)
        if events:
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            s.events.append((e0, e1))
        else:
            s.compress_s += time.perf_counter() - t0
    return out.transpose(0, 1).unsqueeze(0), None  # (1, q, n_q, d) as transformers expects


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register("kvbench", kvbench_attention)
        _registered = True
