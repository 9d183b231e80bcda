"""Append one decoded token to every KV head of the ragged cache, in place (a decode step's cache write).

Head h's new key/value row goes to its first spare row `starts[h] + lengths[h]`, its original position to
`positions` at that row, and `lengths[h]` grows by one, all on the device: nothing is read back to the host,
so a CUDA graph can replay it.

Rolling window (StreamingLLM's sinks + recent tokens, decode-time eviction as a ring buffer): with
`ring_rows > 0`, a head already holding `ring_rows` rows keeps its length and overwrites local row
`ring_next[h]` instead, which then advances through [n_sink, ring_rows) and wraps to n_sink. With rows in
position order (sinks first) that row is the oldest non-sink token: the same set of tokens as appending and
then evicting the oldest, without moving anything. Spare capacity is the caller's promise (`KVBenchCache.reserve`); the torch
reference checks it, the Triton kernel (one tiny program per head, one launch instead of five torch ops)
does not.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_layout, check_triton_inputs, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _append_kernel(kn_ptr, vn_ptr, pos_ptr, k_ptr, v_ptr, p_ptr, starts_ptr, lengths_ptr, ring_next_ptr,
                       stride_knh, stride_vnh, stride_kt, stride_vt, D, ring_rows, n_sink,
                       RING: tl.constexpr, D_PAD: tl.constexpr):
        # grid: (n_kv,)
        h = tl.program_id(0)
        length = tl.load(lengths_ptr + h)
        local = length
        new_length = length + 1
        if RING:
            nxt = tl.load(ring_next_ptr + h)
            full = length >= ring_rows
            local = tl.where(full, nxt, length)
            new_length = tl.where(full, length, length + 1)
            tl.store(ring_next_ptr + h, tl.where(full, tl.where(nxt + 1 >= ring_rows, n_sink, nxt + 1), nxt))
        row = tl.load(starts_ptr + h) + local
        offs = tl.arange(0, D_PAD)
        ok = offs < D
        k = tl.load(kn_ptr + h * stride_knh + offs, mask=ok)
        v = tl.load(vn_ptr + h * stride_vnh + offs, mask=ok)
        tl.store(k_ptr + row * stride_kt + offs, k.to(k_ptr.dtype.element_ty), mask=ok)
        tl.store(v_ptr + row * stride_vt + offs, v.to(v_ptr.dtype.element_ty), mask=ok)
        tl.store(p_ptr + row, tl.load(pos_ptr))
        tl.store(lengths_ptr + h, new_length)


def _check(k_new, v_new, pos, keys, values, positions, starts, lengths):
    check_layout(keys, starts, lengths, values)
    h, d = starts.numel(), keys.shape[1]
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != (h, d):
            raise ValueError(f"{name} must be (n_kv={h}, d={d}), got shape {tuple(t.shape)}")
    if pos.numel() != 1 or pos.dtype != torch.int64:
        raise ValueError(f"pos must be one int64 position, got shape {tuple(pos.shape)} dtype {pos.dtype}")
    if positions.shape != (keys.shape[0],) or positions.dtype != torch.int64:
        raise ValueError(f"positions must be ({keys.shape[0]},) int64, got {tuple(positions.shape)} {positions.dtype}")


def ragged_append_ref(k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                      caps: torch.Tensor | None = None, ring_next: torch.Tensor | None = None, ring_rows: int = 0,
                      n_sink: int = 0) -> None:
    """Torch reference. k_new, v_new: (n_kv, d); pos: one int64. With `caps`, checks the spare room (a sync).
    ring_rows > 0: the rolling window of the module docstring (ring_next: (n_kv,) int64, updated in place)."""
    _check(k_new, v_new, pos, keys, values, positions, starts, lengths)
    full = torch.zeros_like(lengths, dtype=torch.bool)
    if ring_rows > 0:
        _check_ring(ring_next, lengths, ring_rows, n_sink)
        full = lengths >= ring_rows
    grow = lengths + (~full).long()
    if caps is not None and bool((grow > caps).any()):
        h = int((grow > caps).nonzero()[0])
        raise ValueError(f"head {h} is full ({int(lengths[h])} of {int(caps[h])} rows); reserve capacity first")
    local = torch.where(full, ring_next, lengths) if ring_rows > 0 else lengths
    rows = starts + local
    keys.index_copy_(0, rows, k_new.to(keys.dtype))
    values.index_copy_(0, rows, v_new.to(values.dtype))
    positions.index_copy_(0, rows, pos.reshape(1).expand(rows.numel()))
    if ring_rows > 0:
        nxt = torch.where(ring_next + 1 >= ring_rows, torch.full_like(ring_next, n_sink), ring_next + 1)
        ring_next.copy_(torch.where(full, nxt, ring_next))
    lengths.copy_(grow)


def _check_ring(ring_next, lengths, ring_rows, n_sink):
    if ring_next is None or ring_next.shape != lengths.shape or ring_next.dtype != torch.int64:
        raise ValueError(f"ring_rows={ring_rows} needs ring_next: a ({lengths.numel()},) int64 tensor")
    if not 0 <= n_sink < ring_rows:
        raise ValueError(f"n_sink={n_sink}, ring_rows={ring_rows}; allowed: 0 <= n_sink < ring_rows")


def ragged_append_triton(k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor,
                         lengths: torch.Tensor, ring_next: torch.Tensor | None = None, ring_rows: int = 0,
                         n_sink: int = 0) -> None:
    """Triton version of `ragged_append_ref` (no capacity check, no device sync)."""
    _check(k_new, v_new, pos, keys, values, positions, starts, lengths)
    if ring_rows > 0:
        _check_ring(ring_next, lengths, ring_rows, n_sink)
    k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_new, v_new))
    check_triton_inputs(k_new, v_new, keys, values, starts, lengths)
    d = keys.shape[1]
    _append_kernel[(starts.numel(),)](k_new, v_new, pos, keys, values, positions, starts, lengths,
                                      ring_next if ring_rows > 0 else lengths,
                                      k_new.stride(0), v_new.stride(0), keys.stride(0), values.stride(0), d,
                                      ring_rows, n_sink, RING=ring_rows > 0, D_PAD=max(16, next_pow2(d)),
                                      num_warps=1)


def ragged_append(k_new, v_new, pos, keys, values, positions, starts, lengths, ring_next=None, ring_rows=0,
                  n_sink=0) -> None:
    """Append in place: Triton on CUDA, torch reference elsewhere."""
    args = (k_new, v_new, pos, keys, values, positions, starts, lengths)
    if use_triton(k_new, keys, values, positions, starts, lengths):
        return ragged_append_triton(*args, ring_next=ring_next, ring_rows=ring_rows, n_sink=n_sink)
    return ragged_append_ref(*args, ring_next=ring_next, ring_rows=ring_rows, n_sink=n_sink)
