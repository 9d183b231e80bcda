"""Rotary position embedding of one decode token's query and key heads in one launch, instead of the ~10
small kernels of transformers' `apply_rotary_pos_emb` (two products, a negation, a cat and a sum per tensor).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

with torch's roundings kept: each product is rounded to the result dtype, then their sum (so in bf16 on a GPU
and in fp32 anywhere, the kernel aims at torch's bits: tests/test_rope.py checks them). One program per query or
key head row of (1, H, 1, D) tensors (batch 1, one token; any head stride, unit stride along D). `rope_ref` is
transformers' formula (Llama, Mistral, Qwen2, Qwen3: `apply_rotary_pos_emb` with unsqueeze_dim=1), the oracle.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_triton_inputs, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_row(x_ptr, out_ptr, cos_ptr, sin_ptr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        ok = i < HALF
        dt = out_ptr.dtype.element_ty
        x1 = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + i, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + i, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
        # torch: (x * cos) rounded, (rotate_half(x) * sin) rounded, their sum rounded; the launch turns off
        # mul+add contraction (enable_fp_fusion=False), which would skip the products' rounding in fp32
        o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        tl.store(out_ptr + i, o1, mask=ok)
        tl.store(out_ptr + HALF + i, o2, mask=ok)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, n_q, stride_q, stride_k,
                     HALF: tl.constexpr, BLOCK: tl.constexpr):
        """Program r: query head r (r < n_q), else key head r - n_q; outputs are contiguous (1, H, 1, D)."""
        r = tl.program_id(0).to(tl.int64)
        if r < n_q:
            _rope_row(q_ptr + r * stride_q, qo_ptr + r * (2 * HALF), cos_ptr, sin_ptr, HALF, BLOCK)
        else:
            _rope_row(k_ptr + (r - n_q) * stride_k, ko_ptr + (r - n_q) * (2 * HALF), cos_ptr, sin_ptr, HALF, BLOCK)

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x (1, H, 1, D), D even, unit stride along D; cos and sin D contiguous values (one position)."""
    d = x.shape[-1]
    return (x.dim() == 4 and x.shape[0] == 1 and x.shape[2] == 1 and d % 2 == 0 and x.stride(-1) == 1
            and all(t.numel() == d and t.is_contiguous() for t in (cos, sin)))


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`rope_ref` for one token (batch 1) in one launch: queries and keys (1, H, 1, D), each with unit stride along
    D, any head stride. No host sync."""
    for x in (q, k):
        if not fits(x, cos, sin):
            raise ValueError(f"rope_triton: x (1, H, 1, D even) with unit stride along D, cos and sin of D values; "
                             f"got {tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)}, "
                             f"sin {tuple(sin.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope_triton: queries and keys of one head dim, got {q.shape[-1]} and {k.shape[-1]}")
    check_triton_inputs(q, k, cos, sin)
    d = q.shape[-1]
    qo = torch.empty(q.shape, dtype=torch.result_type(q, cos), device=q.device)
    ko = torch.empty(k.shape, dtype=torch.result_type(k, cos), device=k.device)
    if q.shape[1] + k.shape[1]:
        _rope_kernel[(q.shape[1] + k.shape[1],)](q, k, cos, sin, qo, ko, q.shape[1], q.stride(1), k.stride(1),
                                                 HALF=d // 2, BLOCK=next_pow2(d // 2), num_warps=1,
                                                 enable_fp_fusion=False)
    return qo, ko
