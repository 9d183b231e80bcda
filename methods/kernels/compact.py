"""Compaction of the ragged per-head KV cache: keep selected rows of every head, pack them tightly.

This is the storage step shared by every eviction method (SnapKV, H2O, StreamingLLM, PyramidKV, AdaKV...):
after a scorer picks the kept tokens, the kept rows are gathered into a new, smaller buffer so the memory
of the dropped ones is actually freed.

`keep_idx_flat` holds per-head LOCAL indices (0 <= i < lengths[h]), head 0's first, then head 1's, ...;
`keep_counts[h]` says how many belong to head h. Rows are copied in the given order (pass sorted
indices to keep the original token order). new_starts = exclusive cumsum of keep_counts.
"""
from __future__ import annotations

import torch

from . import (HAS_TRITON, check_layout, check_regions, check_triton_inputs, next_pow2, num_programs_hint,
               use_triton)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_kernel(k_ptr, v_ptr, starts_ptr, idx_ptr, counts_ptr, new_starts_ptr, nk_ptr, nv_ptr,
                       stride_kt, stride_vt, stride_nkt, stride_nvt, D, NUM_PROGS,
                       BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
        # grid: (n_kv, NUM_PROGS); program p copies row blocks p, p + NUM_PROGS, ... of its head
        h = tl.program_id(0)
        src = tl.load(starts_ptr + h)
        dst = tl.load(new_starts_ptr + h)  # also where this head's indices start in keep_idx_flat
        count = tl.load(counts_ptr + h)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        for b in range(tl.program_id(1), tl.cdiv(count, BLOCK_R), NUM_PROGS):
            r = b * BLOCK_R + tl.arange(0, BLOCK_R)
            ok = r < count
            local = tl.load(idx_ptr + dst + r, mask=ok, other=0)
            m = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + (src + local)[:, None] * stride_kt + offs_d[None, :], mask=m)
            v = tl.load(v_ptr + (src + local)[:, None] * stride_vt + offs_d[None, :], mask=m)
            tl.store(nk_ptr + (dst + r)[:, None] * stride_nkt + offs_d[None, :], k, mask=m)
            tl.store(nv_ptr + (dst + r)[:, None] * stride_nvt + offs_d[None, :], v, mask=m)


def _check(keys, values, starts, lengths, keep_idx_flat, keep_counts):
    """Validate (one device sync) and return new_starts."""
    check_layout(keys, starts, lengths, values)
    for name, t in (("keep_idx_flat", keep_idx_flat), ("keep_counts", keep_counts)):
        if t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got shape {tuple(t.shape)} dtype {t.dtype}")
    if keep_counts.shape != lengths.shape:
        raise ValueError(f"keep_counts has {keep_counts.numel()} entries, expected one per head ({lengths.numel()})")
    check_regions(keys, starts, lengths)
    counts, lens = keep_counts.tolist(), lengths.tolist()
    if sum(counts) != keep_idx_flat.numel():
        raise ValueError(f"keep_counts sum to {sum(counts)} but keep_idx_flat has {keep_idx_flat.numel()} entries")
    for h, (c, n) in enumerate(zip(counts, lens)):
        if not 0 <= c <= n:
            raise ValueError(f"keep_counts[{h}]={c}; allowed: 0..lengths[{h}]={n}")
    new_starts = torch.cumsum(keep_counts, 0) - keep_counts
    if keep_idx_flat.numel():
        head = torch.repeat_interleave(torch.arange(len(counts), device=keep_counts.device), keep_counts)
        bad = (keep_idx_flat < 0) | (keep_idx_flat >= lengths[head])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"keep_idx_flat[{i}]={int(keep_idx_flat[i])} for head {int(head[i])}; "
                             f"allowed: 0..{int(lengths[head[i]]) - 1}")
    return new_starts


def compact_ref(keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                keep_idx_flat: torch.Tensor, keep_counts: torch.Tensor):
    """Torch reference: one index_select. Returns new_keys, new_values, new_starts, new_lengths."""
    new_starts = _check(keys, values, starts, lengths, keep_idx_flat, keep_counts)
    head = torch.repeat_interleave(torch.arange(keep_counts.numel(), device=keys.device), keep_counts)
    rows = starts[head] + keep_idx_flat
    return keys[rows], values[rows], new_starts, keep_counts.clone()


def compact_triton(keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                   keep_idx_flat: torch.Tensor, keep_counts: torch.Tensor, block_r: int = 32, num_warps: int = 4):
    """Triton version of `compact_ref` (same arguments and results)."""
    new_starts = _check(keys, values, starts, lengths, keep_idx_flat, keep_counts)
    check_triton_inputs(keys, values, starts, lengths, keep_idx_flat, keep_counts)
    total, d = keep_idx_flat.numel(), keys.shape[1]
    n_kv = starts.numel()
    new_keys = torch.empty(total, d, device=keys.device, dtype=keys.dtype)
    new_values = torch.empty(total, d, device=values.device, dtype=values.dtype)
    if total:
        n_progs = max(1, min(triton.cdiv(triton.cdiv(total, n_kv), block_r),
                             triton.cdiv(4 * num_programs_hint(keys.device), n_kv)))
        _gather_kernel[(n_kv, n_progs)](keys, values, starts, keep_idx_flat, keep_counts, new_starts, new_keys,
                                        new_values, keys.stride(0), values.stride(0), new_keys.stride(0),
                                        new_values.stride(0), d, n_progs, BLOCK_R=block_r,
                                        D_PAD=max(16, next_pow2(d)), num_warps=num_warps)
    return new_keys, new_values, new_starts, keep_counts.clone()


def compact(keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
            keep_idx_flat: torch.Tensor, keep_counts: torch.Tensor):
    """Gather the kept rows into a tightly packed buffer: Triton on CUDA, torch reference elsewhere."""
    if use_triton(keys, values, starts, lengths, keep_idx_flat, keep_counts):
        return compact_triton(keys, values, starts, lengths, keep_idx_flat, keep_counts)
    return compact_ref(keys, values, starts, lengths, keep_idx_flat, keep_counts)
