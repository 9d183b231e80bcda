"""Rotary position embedding of one decode token's query and key heads in one launch each, instead of the ~10
small kernels of transformers' `apply_rotary_pos_emb` (two products, a negation, a cat and a sum per tensor).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

with torch's roundings kept: each product is rounded to the result dtype, then their sum (so in bf16 on a GPU
and in fp32 anywhere, the kernel gives torch's bits). One program per head row of a (1, H, 1, D) tensor (batch
1, one token; any row stride, unit stride along D). `rope_ref` is transformers' formula (Llama, Mistral, Qwen2,
Qwen3: `apply_rotary_pos_emb` with unsqueeze_dim=1), the test oracle.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_triton_inputs, next_pow2

if HAS_TRITON:
    import triton.language as tl
    import triton

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_row, HALF: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK)
        ok = i < HALF
        dt = out_ptr.dtype.element_ty
        x1 = tl.load(x_ptr + row * stride_row + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + row * stride_row + HALF + i, mask=ok, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + i, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + i, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
        # torch: (x * cos) rounded, (rotate_half(x) * sin) rounded, their sum rounded
        o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        tl.store(out_ptr + row * (2 * HALF) + i, o1, mask=ok)
        tl.store(out_ptr + row * (2 * HALF) + HALF + i, o2, mask=ok)


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


def rope_one_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` for x (1, H, 1, D) in one launch; no host sync."""
    if not fits(x, cos, sin):
        raise ValueError(f"rope_triton: x (1, H, 1, D even) with unit stride along D, cos and sin of D values; got "
                         f"{tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    check_triton_inputs(x, cos, sin)
    d = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    if x.shape[1]:
        _rope_kernel[(x.shape[1],)](x, cos, sin, out, x.stride(1), HALF=d // 2, BLOCK=next_pow2(d // 2), num_warps=1)
    return out


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`rope_ref` for one token: two launches (queries, keys)."""
    return rope_one_triton(q, cos, sin), rope_one_triton(k, cos, sin)
