"""Rotary position embedding of the queries and keys in one launch, instead of the ~10 small kernels of
transformers' `apply_rotary_pos_emb` (two products, a negation, a cat and a sum per tensor).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

with torch's roundings kept: each product is rounded to the result dtype, then their sum (so in bf16 on a GPU
and in fp32 anywhere, the kernel aims at torch's bits: tests/test_rope.py checks them). Batch 1: (1, H, T, D)
queries and keys (any head and token strides, unit stride along D), a program per head and tile of tokens: one
token while decoding (kvbench/fast_decode.py), a whole context in a small model's graph prefill
(kvbench/graph_prefill.py). `rope_ref` is transformers' formula (Llama, Mistral, Qwen2, Qwen3:
`apply_rotary_pos_emb` with unsqueeze_dim=1), the oracle.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_triton_inputs, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, t, t_ok, stride_t, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """Tokens t (a block; t_ok masks it) of one head: x at x_ptr + t * stride_t, out rows of 2 * HALF."""
        i = tl.arange(0, BLOCK)
        ok = t_ok[:, None] & (i < HALF)[None, :]
        dt = out_ptr.dtype.element_ty
        xr = x_ptr + t[:, None] * stride_t + i[None, :]
        cr = t[:, None] * (2 * HALF) + i[None, :]
        x1 = tl.load(xr, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(xr + HALF, mask=ok, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + cr, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cr + HALF, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cr, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cr + HALF, mask=ok, other=0.0).to(tl.float32)
        # torch: (x * cos) rounded, (rotate_half(x) * sin) rounded, their sum rounded; the launch turns off
        # mul+add contraction (enable_fp_fusion=False), which would skip the products' rounding in fp32
        o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        tl.store(out_ptr + cr, o1, mask=ok)
        tl.store(out_ptr + cr + HALF, o2, mask=ok)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, n_q, T, stride_qh, stride_qt, stride_kh,
                     stride_kt, HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
        """Program (r, b): tokens b * BLOCK_T.. of query head r (r < n_q), else of key head r - n_q; outputs are
        contiguous (1, H, T, D)."""
        r = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        if r < n_q:
            _rope_rows(q_ptr + r * stride_qh, qo_ptr + r * T * (2 * HALF), cos_ptr, sin_ptr, t, t_ok, stride_qt,
                       HALF, BLOCK)
        else:
            _rope_rows(k_ptr + (r - n_q) * stride_kh, ko_ptr + (r - n_q) * T * (2 * HALF), cos_ptr, sin_ptr, t,
                       t_ok, stride_kt, HALF, BLOCK)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x (1, H, T, D), D even, unit stride along D; cos and sin T * D contiguous values (a (1, T, D) batch-1
    position table, as transformers' rotary embedding makes it)."""
    d = x.shape[-1]
    return (x.dim() == 4 and x.shape[0] == 1 and d % 2 == 0 and x.stride(-1) == 1
            and all(t.numel() == x.shape[2] * d and t.shape[-1] == d and t.is_contiguous() for t in (cos, sin)))


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`rope_ref` for batch 1 in one launch: queries and keys (1, H, T, D), each with unit stride along D, any
    head and token strides. No host sync."""
    for x in (q, k):
        if not fits(x, cos, sin):
            raise ValueError(f"rope_triton: x (1, H, T, D even) with unit stride along D, cos and sin of T x D "
                             f"values; got {tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)}, "
                             f"sin {tuple(sin.shape)}")
    if q.shape[2:] != k.shape[2:]:
        raise ValueError(f"rope_triton: queries and keys of one length and head dim, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    check_triton_inputs(q, k, cos, sin)
    t, d = q.shape[2], q.shape[-1]
    qo = torch.empty(q.shape, dtype=torch.result_type(q, cos), device=q.device)
    ko = torch.empty(k.shape, dtype=torch.result_type(k, cos), device=k.device)
    if (q.shape[1] + k.shape[1]) * t:
        block_t = min(16, next_pow2(t))  # one token per program while decoding; tiles of 16 in a prefill
        _rope_kernel[(q.shape[1] + k.shape[1], triton.cdiv(t, block_t))](
            q, k, cos, sin, qo, ko, q.shape[1], t, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
            HALF=d // 2, BLOCK=next_pow2(d // 2), BLOCK_T=block_t, num_warps=1 if block_t == 1 else 4,
            enable_fp_fusion=False)
    return qo, ko
