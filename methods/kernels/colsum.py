"""Accumulated attention: per key, the sum of the softmax attention probabilities over all query rows.

This is H2O's "heavy hitter" score (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models"), summed over the g query heads of each KV head (GQA).

The Triton version never materializes the n x n matrix. Two passes over key tiles:
  1. `_row_stats_kernel`: per query row, the running max and sum of its (causal) scores (online softmax,
     split over chunks of keys when there are few rows);
  2. `_colsum_kernel`: per key tile, recompute the scores against every query tile that can see it,
     normalize with the row's log-sum-exp (pass 1's chunks merged in the kernel) and add the column sums.
A short window (SnapKV: g * w = 4 x 32 query rows per KV head) is "stacked": all g * w rows of a KV head form
one tile, so each key tile is read once per pass instead of once per query head, and pass 2 loads the rows'
queries and log-sum-exps once per program. Longer row sets (H2O's whole prefill) are tiled per query head.
Both work on the ragged flat-packed layout (see the package docstring), with the w query rows of a head
sitting at the LAST w positions of that head's keys: row i may see keys at positions <= L - w + i.
The same two kernels serve SnapKV's window scores (w = window) and H2O's prefill scores (w = the prompt).
"""
from __future__ import annotations

import torch

from . import (HAS_TRITON, check_triton_inputs, group_size, next_pow2, num_programs_hint,
               resolve_scaling, use_triton)

LOG2E = 1.4426950408889634

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_rows(pid, W, G, STACK: tl.constexpr, BLOCK_M: tl.constexpr):
        # A program's query rows: (query head, window row, valid) per tile row. STACK: the W rows of all G
        # query heads of KV head `pid` in one tile (BLOCK_M >= G * W), so each key tile is read once, not G
        # times; else BLOCK_M rows of query head `pid`, from row tl.program_id(1) * BLOCK_M.
        if STACK:
            m = tl.arange(0, BLOCK_M)
            head, rows, ok = pid * G + m // W, m % W, m < G * W
        else:
            rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
            head, ok = tl.zeros((BLOCK_M,), tl.int32) + pid, rows < W
        return head, rows, ok

    @triton.jit
    def _row_stats_kernel(q_ptr, k_ptr, starts_ptr, lengths_ptr, m_ptr, l_ptr,
                          stride_qh, stride_qw, stride_kt, W, G, D, scale_log2,
                          NUM_SPLITS: tl.constexpr, CAUSAL: tl.constexpr, STACK: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
        # grid: (n_q, cdiv(W, BLOCK_M), NUM_SPLITS), or with STACK (n_kv, 1, NUM_SPLITS): one tile of rows
        # against one chunk of the keys they can see; writes the running max and sum (base 2) of that chunk
        head, rows, row_ok = _tile_rows(tl.program_id(0), W, G, STACK, BLOCK_M)
        h = tl.program_id(0)
        if not STACK:
            h = h // G
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        q = tl.load(q_ptr + head[:, None] * stride_qh + rows[:, None] * stride_qw + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        pos = length - W + rows  # absolute position of each row inside the head
        seen = length
        if CAUSAL and not STACK:  # keys past the tile's last row are never seen (a stacked tile holds row W-1)
            seen = tl.minimum(length, length - W + tl.program_id(1) * BLOCK_M + BLOCK_M)
        # split-K over the seen keys: a short window (SnapKV, w=32) still fills the device
        chunk = tl.cdiv(tl.cdiv(seen, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = tl.program_id(2) * chunk
        hi = tl.minimum(lo + chunk, seen)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + offs_n
            k = tl.load(k_ptr + (start + cols)[:, None] * stride_kt + offs_d[None, :],
                        mask=(cols < hi)[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            ok = (cols < hi)[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= pos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row may see nothing in this chunk yet
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        idx = (head * W + rows) * NUM_SPLITS + tl.program_id(2)
        tl.store(m_ptr + idx, m_i, mask=row_ok)
        tl.store(l_ptr + idx, l_i, mask=row_ok)

    @triton.jit
    def _row_lse(m_ptr, l_ptr, row, row_ok, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
        # merge pass 1's split-K chunks of each row into its base-2 log-sum-exp (0 on invalid rows);
        # chunk 0 holds key 0, seen by every row, so a valid row's max is finite
        s = tl.arange(0, SPLITS_PAD)
        ok = row_ok[:, None] & (s < NUM_SPLITS)[None, :]
        mm = tl.load(m_ptr + row[:, None] * NUM_SPLITS + s[None, :], mask=ok, other=float("-inf"))
        ll = tl.load(l_ptr + row[:, None] * NUM_SPLITS + s[None, :], mask=ok, other=0.0)
        m_max = tl.where(row_ok, tl.max(mm, 1), 0.0)
        total = tl.where(row_ok, tl.sum(ll * tl.exp2(mm - m_max[:, None]), 1), 1.0)
        return m_max + tl.log2(total)

    @triton.jit
    def _colsum_kernel(q_ptr, k_ptr, starts_ptr, lengths_ptr, m_ptr, l_ptr, out_ptr,
                       stride_qh, stride_qw, stride_kt, W, G, D, scale_log2, NUM_PROGS,
                       NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                       STACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
        # grid: (n_kv, NUM_PROGS); program p handles key tiles p, p + NUM_PROGS, ... of its head
        h = tl.program_id(0)
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        d_ok = offs_d < D
        if STACK:  # every row of the KV head in one tile: queries and log-sum-exps loaded once
            head, rows, row_ok = _tile_rows(h, W, G, STACK, BLOCK_M)
            q = tl.load(q_ptr + head[:, None] * stride_qh + rows[:, None] * stride_qw + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = _row_lse(m_ptr, l_ptr, head * W + rows, row_ok, NUM_SPLITS, SPLITS_PAD)
            for b in range(tl.program_id(1), tl.cdiv(length, BLOCK_N), NUM_PROGS):
                cols = b * BLOCK_N + offs_n
                col_ok = cols < length
                k = tl.load(k_ptr + (start + cols)[:, None] * stride_kt + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
                ok = row_ok[:, None] & col_ok[None, :]
                if CAUSAL:
                    ok = ok & (cols[None, :] <= (length - W + rows)[:, None])
                acc = tl.sum(tl.where(ok, tl.exp2(s - lse[:, None]), 0.0), 0)
                tl.store(out_ptr + start + cols, acc, mask=col_ok)
        else:
            for b in range(tl.program_id(1), tl.cdiv(length, BLOCK_N), NUM_PROGS):
                cols = b * BLOCK_N + offs_n
                col_ok = cols < length
                k = tl.load(k_ptr + (start + cols)[:, None] * stride_kt + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                acc = tl.zeros((BLOCK_N,), tl.float32)
                i_lo = 0
                if CAUSAL:
                    # rows before this one cannot see any key of the tile
                    i_lo = (tl.maximum(b * BLOCK_N - (length - W), 0) // BLOCK_M) * BLOCK_M
                for jj in range(0, G):
                    j = h * G + jj
                    for i0 in range(i_lo, W, BLOCK_M):
                        rows = i0 + offs_m
                        row_ok = rows < W
                        q = tl.load(q_ptr + j * stride_qh + rows[:, None] * stride_qw + offs_d[None, :],
                                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                        lse = _row_lse(m_ptr, l_ptr, j * W + rows, row_ok, NUM_SPLITS, SPLITS_PAD)
                        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
                        ok = row_ok[:, None] & col_ok[None, :]
                        if CAUSAL:
                            ok = ok & (cols[None, :] <= (length - W + rows)[:, None])
                        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
                        acc += tl.sum(p, 0)
                tl.store(out_ptr + start + cols, acc, mask=col_ok)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact products (tf32 would cost ~1e-3 relative error); bf16/fp16 ignore this flag
    return "ieee" if dtype == torch.float32 else "tf32"


STACK_MAX_ROWS = 128  # a KV head's g * w query rows in one tile up to this many (SnapKV's 4 x 32 = 128)


def stack_block(n_q: int, w: int, n_kv: int, stack: bool | None = None) -> int | None:
    """The tile height that stacks every query row of a KV head (g * w, padded to a power of two, >= 16), or
    None: the rows are tiled per query head. stack=None: stack when g * w <= STACK_MAX_ROWS."""
    rows = group_size(n_q, n_kv) * w
    if stack is None:
        stack = rows <= STACK_MAX_ROWS
    return max(16, next_pow2(rows)) if stack else None


def ragged_row_stats_triton(q: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                            scale_log2: float, causal: bool = True, max_length: int | None = None,
                            block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                            splits: int | None = None, stack: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1. q (n_q, w, d) -> per row and key chunk the running max and sum (base 2) of its (scaled,
    masked) scores, two (n_q, w, splits) float32 tensors; `ragged_colsum_triton` merges the chunks."""
    n_q, w, d = q.shape
    n_kv = starts.numel()
    g = group_size(n_q, n_kv)
    stacked = stack_block(n_q, w, n_kv, stack)
    block_m = stacked or block_m
    grid0, row_tiles = (n_kv, 1) if stacked else (n_q, triton.cdiv(w, block_m))
    rows_per_head = max_length if max_length is not None else keys.shape[0] // max(n_kv, 1)
    if splits is None:  # split the keys only when there are too few row tiles to fill the device
        if stacked:
            # a stacked tile (up to 128 rows x d) runs one program per SM: one wave of at most one per SM (H200,
            # 8 KV heads, 16 splits, bench/compress_breakdown.py: 95 us at 32K; 17 splits, 136 programs on 132
            # SMs, 107 us; 33 splits, 123 us)
            programs = max(1, num_programs_hint(keys.device) // 2 // grid0)
        else:
            programs = triton.cdiv(num_programs_hint(keys.device), grid0 * row_tiles)
        splits = max(1, min(triton.cdiv(rows_per_head, 4 * block_n), programs))
    m = torch.empty(n_q, w, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _row_stats_kernel[(grid0, row_tiles, splits)](
        q, keys, starts, lengths, m, l, q.stride(0), q.stride(1), keys.stride(0), w, g, d, scale_log2,
        NUM_SPLITS=splits, CAUSAL=causal, STACK=stacked is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        D_PAD=max(16, next_pow2(d)), DOT_PRECISION=_dot_precision(keys.dtype), num_warps=num_warps)
    return m, l


def ragged_colsum_triton(q: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor,
                         starts: torch.Tensor, lengths: torch.Tensor, scale_log2: float, causal: bool = True,
                         max_length: int | None = None, block_m: int = 32, block_n: int = 64,
                         num_warps: int = 4, stack: bool | None = None,
                         programs: int | None = None) -> torch.Tensor:
    """Pass 2. Row-aligned (T,) float32: per key, sum over the w rows and g heads of exp2(s - lse), the
    log-sum-exps merged in the kernel from pass 1's chunk `stats`. `programs`: per KV head (default: about 8
    per SM over the KV heads, 2 with stacked rows; at most one per key tile).

    `max_length` only sizes the grid (programs loop over tiles, so any value is correct); without it the
    grid is sized from the average head length, which needs no device sync.
    """
    n_q, w, d = q.shape
    n_kv = starts.numel()
    g = group_size(n_q, n_kv)
    m, l = stats
    splits = m.shape[-1]
    stacked = stack_block(n_q, w, n_kv, stack)
    out = torch.zeros(keys.shape[0], device=keys.device, dtype=torch.float32)
    rows_per_head = max_length if max_length is not None else keys.shape[0] // max(n_kv, 1)
    if programs is None:  # stacked: 2 per SM over the KV heads, each looping over key tiles with its queries
        # loaded once (H200, 8 heads, bench/compress_breakdown.py: 36 us at 8K against 45 with 8 per SM)
        programs = triton.cdiv((1 if stacked else 4) * num_programs_hint(keys.device), n_kv)
    n_progs = max(1, min(triton.cdiv(max(rows_per_head, 1), block_n), programs))
    _colsum_kernel[(n_kv, n_progs)](q, keys, starts, lengths, m, l, out, q.stride(0), q.stride(1),
                                    keys.stride(0), w, g, d, scale_log2, n_progs, NUM_SPLITS=splits,
                                    SPLITS_PAD=max(2, next_pow2(splits)), CAUSAL=causal,
                                    STACK=stacked is not None, BLOCK_M=stacked or block_m, BLOCK_N=block_n,
                                    D_PAD=max(16, next_pow2(d)), DOT_PRECISION=_dot_precision(keys.dtype),
                                    num_warps=num_warps)
    return out


def _check_dense(q: torch.Tensor, keys: torch.Tensor) -> None:
    if q.dim() != 3 or keys.dim() != 3:
        raise ValueError(f"q must be (n_q, m, d) and keys (n_kv, n, d), got {tuple(q.shape)} and {tuple(keys.shape)}")
    if q.shape[2] != keys.shape[2] or q.shape[1] > keys.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} vs keys {tuple(keys.shape)}: need the same d and m <= n")
    group_size(q.shape[0], keys.shape[0])


def attention_colsum_ref(q: torch.Tensor, keys: torch.Tensor, scaling: float | None = None, causal: bool = True,
                         chunk_rows: int = 256) -> torch.Tensor:
    """Torch reference. q (n_q, m, d), keys (n_kv, n, d) -> (n_kv, n) float32.

    The m query rows are the last m positions (m = n for a whole prefill): row i sees keys <= n - m + i
    when causal. Chunks over query rows so memory stays at n_q * chunk_rows * n floats.
    """
    _check_dense(q, keys)
    n_q, m, d = q.shape
    n_kv, n, _ = keys.shape
    g = n_q // n_kv
    scaling = resolve_scaling(scaling, d)
    k = keys.float()
    out = torch.zeros(n_kv, n, dtype=torch.float32, device=keys.device)
    cols = torch.arange(n, device=keys.device)
    for r0 in range(0, m, chunk_rows):
        qc = q[:, r0:r0 + chunk_rows].float().reshape(n_kv, g, -1, d)  # (n_kv, g, c, d)
        s = torch.einsum("hgcd,hnd->hgcn", qc, k) * scaling
        if causal:
            pos = n - m + torch.arange(r0, r0 + qc.shape[2], device=keys.device)
            s = s.masked_fill(cols[None, :] > pos[:, None], float("-inf"))
        out += torch.softmax(s, dim=-1).sum(dim=(1, 2))
    return out


def attention_colsum_triton(q: torch.Tensor, keys: torch.Tensor, scaling: float | None = None, causal: bool = True,
                            block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                            stack: bool | None = None) -> torch.Tensor:
    """Triton version of `attention_colsum_ref` (same arguments and result); `stack`: see `stack_block`."""
    _check_dense(q, keys)
    check_triton_inputs(q, keys)
    n_kv, n, d = keys.shape
    q = q.to(keys.dtype) if q.stride(-1) == 1 else q.to(keys.dtype).contiguous()
    flat = keys.reshape(n_kv * n, d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    starts = torch.arange(n_kv, device=keys.device, dtype=torch.int64) * n
    lengths = torch.full((n_kv,), n, device=keys.device, dtype=torch.int64)
    scale_log2 = resolve_scaling(scaling, d) * LOG2E
    stats = ragged_row_stats_triton(q, flat, starts, lengths, scale_log2, causal, n, block_m, block_n, num_warps,
                                    stack=stack)
    out = ragged_colsum_triton(q, stats, flat, starts, lengths, scale_log2, causal, n, block_m, block_n, num_warps,
                               stack=stack)
    return out.view(n_kv, n)


def attention_colsum(q: torch.Tensor, keys: torch.Tensor, scaling: float | None = None,
                     causal: bool = True) -> torch.Tensor:
    """H2O accumulated attention (n_kv, n): Triton on CUDA, torch reference elsewhere."""
    if use_triton(q, keys):
        return attention_colsum_triton(q, keys, scaling, causal)
    return attention_colsum_ref(q, keys, scaling, causal)


__all__ = ["attention_colsum", "attention_colsum_ref", "attention_colsum_triton", "LOG2E"]
