"""RMSNorm of a decode step's rows in one launch (Llama's formula), instead of the ~7 element-wise and reduction
kernels transformers' `LlamaRMSNorm.forward` launches (to fp32, square, mean, + eps, rsqrt, scale, to the input
dtype, times the weight). At batch 1 each of those kernels moves a few KB and costs its launch: a decode step of
a 30-layer model runs ~60 norms, ~420 kernels (bench/decode_breakdown.py).

    y = weight * (x_fp32 * rsqrt(mean(x_fp32 ** 2) + eps)).to(x.dtype)      (rows of x's last dim)

the product rounded to the result dtype torch would give (`torch.result_type(weight, x)`). One program per row,
the whole row in one block (hidden sizes up to 16K). `rmsnorm_ref` is that formula in torch, as transformers
writes it (Llama, Mistral, Qwen2, Qwen3); the only difference allowed is the order of the fp32 sum of squares.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_triton_inputs, next_pow2

MAX_COLS = 16384  # one block per row; wider rows fall back to the reference

if HAS_TRITON:
    import triton.language as tl
    import triton

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        h = (xf * tl.rsqrt(var + eps)).to(x.dtype)  # as torch.rsqrt on CUDA: the fast reciprocal root
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        y = w.to(tl.float32) * h.to(tl.float32)  # a bf16 x bf16 product: fp32, rounded once on the store
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, verbatim in effect."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(x.dtype)


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm_ref` in one launch for contiguous x (..., N) and weight (N,); no host sync."""
    n = x.shape[-1]
    if tuple(weight.shape) != (n,) or not x.is_contiguous() or n > MAX_COLS:
        raise ValueError(f"rmsnorm_triton: contiguous x (..., N <= {MAX_COLS}) and weight (N,); got "
                         f"{tuple(x.shape)} (contiguous {x.is_contiguous()}) and {tuple(weight.shape)}")
    check_triton_inputs(x, weight)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    rows = x.numel() // n if n else 0
    if rows:
        block = next_pow2(n)
        _rmsnorm_kernel[(rows,)](x, weight, out, n, float(eps), BLOCK=block, num_warps=4 if block <= 4096 else 8)
    return out
