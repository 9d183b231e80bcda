"""One token through an nn.Linear: y = W x (+ b), a batch-1 GEMV that should read W at the copy bandwidth.

A decode step of an 8B Llama is mostly these GEMVs, and cuBLAS reads the small ones (k/v 1024x4096, q/o
4096x4096) well below the bandwidth on an H200: too few CTAs to keep every SM's loads in flight. Here program
(i, s) of a (cdiv(N, block_n), split_k) grid sums rows i*block_n .. +block_n of W over the s-th slice of K,
block_k columns at a time (coalesced along K, W's contiguous dim; W is streamed once, so its loads ask to be
evicted first), in an fp32 (block_n, block_k) accumulator reduced once at the end. split_k = 1 writes y
directly; split_k > 1 writes fp32 partial sums to a (split_k, N) workspace that a second tiny program sums in a
fixed order (deterministic, bias added there). Nothing is read back to the host: a CUDA graph can capture it.

Default config (`gemv_config`): one row per program (block_n 1), block_k 1024 (clamped to K), 4 warps, no split
unless the rows alone are fewer than `target_programs` (2 per SM; then split_k = cdiv(target, N), at most one
slice per block_k columns). Measured by bench/gemv_gpu.py on an H200 (reports/examples/gemv_h200.txt): that
config was the fastest of a 20-53 config grid for every Llama-3.1-8B shape (k/v 1024x4096 1.77 TB/s against
cuBLAS's 1.20; q/o 4096x4096 and down 4096x14336 4.07 TB/s; lm_head 4.36 against 3.79), and every linear of
the model once took 4.02 ms against cuBLAS's 4.61 (copy roofline 3.57 ms). The earlier guess (block_n 4, K
split for k/v) took 4.93 ms.

`gemv_ref` is the torch reference (fp32 accumulation) and the test oracle (tests/test_gemv.py).
"""
from __future__ import annotations

import math

import torch

from . import HAS_TRITON, check_triton_inputs, next_pow2, num_programs_hint

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, N, K, stride_wn, k_per_split,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (i, s): out[s, rows] = W[rows, K slice s] . x[K slice s] (+ bias); rows = i's block_n rows."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # int64: lm_head rows x stride nears 2**31
        k_lo = tl.program_id(1) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * xv[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(1) * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _gemv_reduce_kernel(ws_ptr, out_ptr, bias_ptr, N, split_k, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """out[rows] = sum over s = 0, 1, ... of ws[s, rows] (+ bias), in that order."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, split_k):
            y += tl.load(ws_ptr + s * N + rows, mask=ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=ok)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: x (..., K) @ weight (N, K).T (+ bias (N,)) accumulated in fp32, returned as x.dtype.
    (Any number of tokens; the Triton version takes one.)"""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def split_plan(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(slices, columns per slice) for splitting K into at most `split_k` slices of whole block_k blocks, none
    empty: K = 4096 in 1024-blocks asked for 3 slices gets 2 of 2048 (fewer slices than asked, never more)."""
    blocks = max(1, math.ceil(k / block_k))
    per = math.ceil(blocks / max(1, split_k))
    return math.ceil(blocks / per), per * block_k


def gemv_config(n: int, k: int, target_programs: int) -> dict:
    """The default config of the module docstring for W (n, k), aiming at `target_programs` programs."""
    block_n, block_k = 1, min(1024, max(16, next_pow2(k)))
    row_blocks = math.ceil(n / block_n)
    split_k = 1 if row_blocks >= target_programs else min(math.ceil(target_programs / row_blocks),
                                                          math.ceil(k / block_k))
    return {"block_n": block_n, "block_k": block_k, "split_k": split_plan(k, block_k, split_k)[0], "num_warps": 4}


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                num_warps: int | None = None) -> torch.Tensor:
    """`gemv_ref` for one token in one launch (two with split_k > 1). x: (..., K), leading dims multiplying to 1;
    weight: (N, K) with unit column stride; bias: (N,) or None. Returns (..., N) in x.dtype. Configs left as None
    come from `gemv_config`; block sizes must be powers of two; split_k may shrink (`split_plan`). No host sync."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"gemv: x (..., K) and weight (N, K); got {tuple(x.shape)} and {tuple(weight.shape)}")
    if math.prod(x.shape[:-1]) != 1:
        raise ValueError(f"gemv_triton takes one token: x's leading dims must multiply to 1, got {tuple(x.shape)}")
    n, k = weight.shape
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"gemv: bias must be ({n},), got {tuple(bias.shape)}")
    x1 = x.reshape(k).contiguous()
    check_triton_inputs(x1, weight, *([] if bias is None else [bias]))
    default = gemv_config(n, k, num_programs_hint(weight.device))
    block_n = block_n or default["block_n"]
    block_k = block_k or default["block_k"]
    num_warps = num_warps or default["num_warps"]
    splits, k_per_split = split_plan(k, block_k, split_k or default["split_k"])
    out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, block_n), splits)
    if splits == 1:
        _gemv_kernel[grid](x1, weight, out, bias if bias is not None else out, n, k, weight.stride(0), k_per_split,
                           HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
        return out
    ws = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[grid](x1, weight, ws, ws, n, k, weight.stride(0), k_per_split,
                       HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    _gemv_reduce_kernel[(triton.cdiv(n, 1024),)](ws, out, bias if bias is not None else out, n, splits,
                                                 HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)
    return out
