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

Sliding windows (Mistral, Qwen2/3, Gemma-2/3 local layers) and Gemma-2's logit soft cap are computed exactly
as transformers' eager attention (every path, the Triton kernel included; never the flash shortcut). Any
other argument that would change the math (gpt-oss's attention sinks `s_aux`, dropout, a bidirectional
layer) raises: kvbench.models refuses such models up front, this is the backstop.
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
    masks: dict = field(default_factory=dict)   # (q_len, L, device) -> causal mask, shared by the forward's layers

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


_STATIC: object | None = None  # kvbench.graph_prefill's attention while it prefills into a static store


@contextlib.contextmanager
def inplace_prefill(attend):
    """While active, every attention call is `attend(module, query, key, value, scaling, window, softcap)`
    (kvbench/graph_prefill.py: a forward captured in a CUDA graph writes a preallocated store)."""
    global _STATIC
    prev, _STATIC = _STATIC, attend
    try:
        yield
    finally:
        _STATIC = prev


def _causal_mask(q_len: int, L: int, device) -> torch.Tensor | None:
    """Boolean (q_len, L) mask: the q_len new tokens are the last q_len keys."""
    if q_len == 1:
        return None
    s = getattr(_state, "s", None)
    key = (q_len, L, str(device))
    if s is not None and key in s.masks:  # every layer of a full cache asks for the same one
        return s.masks[key]
    qpos = torch.arange(L - q_len, L, device=device).view(q_len, 1)
    mask = torch.arange(L, device=device).view(1, L) <= qpos
    if s is not None and q_len * L <= 1 << 24:  # a question's mask, not a long prefill's (L x L) one
        s.masks[key] = mask
    return mask


def _visible(q_len: int, kpos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Boolean (..., q_len, L) mask of the keys each new token sees (None: all of them).

    kpos (..., L): the original positions of a head's rows (or of every head's, (h, L)). Causality is by row
    (the new tokens are the last q_len rows, as `_causal_mask`). A sliding window is by position, because
    rows may have been evicted or reordered: transformers' `sliding_window_overlay` lets the query at
    position p see keys with `kv_idx > p - sliding_window`, i.e. the `window` positions up to p itself."""
    mask = _causal_mask(q_len, kpos.shape[-1], kpos.device)
    if window is not None:
        qpos = kpos[..., kpos.shape[-1] - q_len:].unsqueeze(-1)  # (..., q, 1): the new tokens' positions
        near = kpos.unsqueeze(-2) > qpos - window                 # (..., q, L)
        mask = near if mask is None else mask & near
    return mask


# explicit attention materializes (heads, rows, keys) float32 scores: cut the rows so one piece stays
# at about 2^27 scores (512 MiB), e.g. a long Gemma-2 prefill on the GPU
_MAX_SCORES = 1 << 27


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, mask: torch.Tensor | None,
              softcap: float | None, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out, as transformers' eager attention of Gemma-2 computes it: scores are
    scaled, then soft-capped (softcap * tanh(score / softcap)), then masked. q (h, g, m, d), k/v (h, L, d),
    mask broadcastable to (h, g, m, L) or None; bias (h, L) or None: per-row log-weights added to the scores
    (a merged row counts as the tokens it replaces). Returns out (h, g, m, d) and probs (h, g, m, L) float32."""
    s = (q.float() @ k.float().unsqueeze(1).transpose(-1, -2)) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.float()[:, None, None, :]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))  # never a fully masked row: each token sees itself
    p = torch.softmax(s, dim=-1)
    return p.to(v.dtype) @ v.unsqueeze(1), p


def _explicit_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                   mask: torch.Tensor | None, softcap: float | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`_explicit`'s output, a piece of query rows at a time (the mask's rows are its dim -2)."""
    h, g, m, _ = q.shape
    step = max(1, _MAX_SCORES // (h * g * k.shape[1]))
    return torch.cat([_explicit(q[:, :, i:i + step], k, v, scaling,
                                None if mask is None else mask[..., i:i + step, :], softcap, bias)[0]
                      for i in range(0, m, step)], dim=2)


def attend(query: torch.Tensor, layer: LayerKV, scaling: float, need_probs: bool = False,
           window: int | None = None, softcap: float | None = None):
    """Exact attention of query (n_q, q, d) over the layer's cache. Returns (out (n_q, q, d), probs or None).

    probs (decode only): per KV head, the new token's attention over that head's rows summed over the group.
    window: a sliding window of that many positions (Mistral, Qwen2, Gemma-2/3 local layers); softcap: the
    scores' tanh soft cap (Gemma-2). Both as transformers' eager attention computes them.
    """
    if not isinstance(layer, LayerKV):  # another storage format (kvbench/store.py) attends over its own rows
        return layer.attend(query, scaling, need_probs, window, softcap)
    n_q, q_len, d = query.shape
    h = layer.n_heads
    g = n_q // h
    lw = layer.log_weight()
    if q_len == 1 and _decode_kernel(query) == "triton":  # its probabilities know windows, softcap, log-weights
        return _attend_decode_triton(query, layer, scaling, need_probs, window, softcap)
    plain = window is None and softcap is None and lw is None
    if layer.is_uniform() and (plain or need_probs):
        k, v, kpos = layer.dense()
        L = k.shape[1]
        if need_probs:
            mask = _visible(q_len, kpos, window)  # (h, q, L) with a window: per head, rows were evicted per head
            mask = None if mask is None else mask.unsqueeze(-3)  # shared by the g query heads of a KV head
            bias = None if lw is None else lw.view(h, -1)[:, :L]
            out, p = _explicit(query.view(h, g, q_len, d), k, v, scaling, mask, softcap, bias)
            return out.view(n_q, q_len, d), list(p.sum(dim=(1, 2)).unbind(0))
        if query.is_cuda and q_len == L and q_len > 1:
            # a fresh prefill: causal over a square score matrix, so flash attention needs no mask tensor
            out = F.scaled_dot_product_attention(query.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                                 is_causal=True, scale=scaling, enable_gqa=g > 1)[0]
            return out, None
        mask = _causal_mask(q_len, L, query.device)
        out = F.scaled_dot_product_attention(query.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                             attn_mask=mask, scale=scaling, enable_gqa=g > 1)[0]
        return out, None
    # each KV head on its own: ragged layers (the torch reference; the GPU decode uses the Triton kernel), and
    # windows/softcap (a window's mask differs per head, and a per-head (q, L) mask stays small)
    outs, probs = [], []
    for j in range(h):
        k, v, kpos = layer.head(j)
        qj = query[j * g:(j + 1) * g]  # (g, q, d)
        L = k.shape[0]
        mask = _visible(q_len, kpos, window)  # (q, L) or None
        if need_probs or softcap is not None or lw is not None:
            bias = None if lw is None else layer.side_head("log_weight", j).unsqueeze(0)
            args = (qj.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scaling, mask, softcap, bias)
            if need_probs:
                out, p = _explicit(*args)
                probs.append(p.sum(dim=(0, 1, 2)))
            else:
                out = _explicit_rows(*args)
            outs.append(out[0])
        else:
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


def _attend_decode_triton(query: torch.Tensor, layer: LayerKV, scaling: float, need_probs: bool,
                          window: int | None = None, softcap: float | None = None):
    """One new token over the whole cache with the Triton kernel (same results as the reference above).

    Only device tensors are read (keys, values, starts, lengths), never the host copies of the lengths,
    so this is safe inside a CUDA graph; the per-head split of `probs` uses the host copies (eager only)."""
    from kvbench.methods.kernels import ragged_decode_attention_triton
    q_pos = None
    if window is not None:  # the new token is every head's last row; head 0's says its position
        q_pos = layer.positions.index_select(0, layer.starts[:1] + layer.lengths[:1] - 1)
    res = ragged_decode_attention_triton(query[:, 0], layer.keys, layer.values, layer.starts, layer.lengths,
                                         scaling, return_probs=need_probs, softcap=softcap, window=window,
                                         positions=layer.positions, q_pos=q_pos, log_weight=layer.log_weight())
    if not need_probs:
        return res.unsqueeze(1), None
    out, flat = res
    probs = [flat[s:s + n] for s, n in zip(layer._starts, layer._lens)]
    return out.unsqueeze(1), probs


# Keyword arguments transformers passes to attention functions that do not change its result here: positions
# come from the cache, kvbench returns no attention weights, the rest are bookkeeping of the model's forward.
_HARMLESS_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_attentions",
                              "output_hidden_states", "output_router_logits", "return_dict", "past_key_values",
                              "cache", "layer_idx", "is_causal", "position_embeddings"})


def attention_options(module, dropout: float = 0.0, **kwargs) -> tuple[int | None, float | None]:
    """(sliding window, softcap) of this layer, from what transformers passes; anything else that would
    change the attention (attention sinks `s_aux`, dropout, packed sequences, a non-causal layer) raises:
    a model whose attention we do not implement exactly is refused, never silently computed wrong."""
    unknown = sorted(k for k, v in kwargs.items()
                     if k not in _HARMLESS_KWARGS and k not in ("sliding_window", "softcap") and v is not None)
    if unknown:
        raise ValueError(f"kvbench attention does not implement {', '.join(unknown)} "
                         f"(passed by {type(module).__name__}); this model is not supported")
    if dropout:
        raise ValueError(f"kvbench attention got dropout={dropout}; allowed: 0 (inference)")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError(f"{type(module).__name__} is not causal (bidirectional attention); kvbench attention "
                         "is causal only")
    window = kwargs.get("sliding_window")
    if window is None:
        # Qwen2-MoE masks its sliding layers without passing the window: the layer carries it
        window = getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    return (int(window) if window else None), (float(softcap) if softcap else None)


def kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if query.is_cuda and query.device.index != torch.cuda.current_device():
        # a model spread over GPUs (model.device_map): Triton launches its kernels, and CUDA events record, on
        # the *current* device, so this layer's work must run with its own GPU current
        with torch.cuda.device(query.device):
            return _kvbench_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return _kvbench_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    window, softcap = attention_options(module, dropout, **kwargs)
    if _STATIC is not None:
        return _STATIC(module, query, key, value, scaling, window, softcap)
    if _INPLACE is not None:
        from kvbench.fast_decode import inplace_attention
        return inplace_attention(module, query, key, value, _INPLACE, scaling, window, softcap)
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
    if window is not None and s.cache.seen_tokens + q.shape[1] <= window:
        window = None  # every position so far is < window: no key has left it yet, the plain path is exact
    out, probs = attend(q, layer, scaling, need_probs, window, softcap)
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
            if isinstance(layer, LayerKV):  # (methods that observe fed tokens keep plain rows: build_method)
                method.observe_prefill(ctx)  # accumulating scorers also see tokens fed after compression
            if s.phase == "prefill" and s.is_last_chunk:
                method.compress_layer(ctx)
                if method.formats():
                    method.keep_query_window(s.cache, layer_idx, q)
                    if method.encodes_per_layer():
                        method.encode_layer(s.cache, layer_idx)  # store the kept rows in the method's format now
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
