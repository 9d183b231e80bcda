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

Fused forms for a decoder layer's step (kvbench/fast_decode.py's `fused` linears), each in one launch, without
copying a weight: `gemv_many_triton` (a layer's q/k/v: one program per row of the stacked weights, the same sums
as `gemv_triton`'s default config), `gemv_silu_mul_triton` (SiLU(gate) * up, both rows streamed by one program;
`silu_mul_ref`), and `gemv_triton(residual=)` (the residual add in the store). Each keeps torch's roundings to the
output dtype between its steps.

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
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, N, K, stride_wn, k_per_split,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (i, s): out[s, rows] = W[rows, K slice s] . x[K slice s] (+ bias) (+ res, added to the result
        rounded to out's dtype, as torch adds to a linear's output); rows = i's block_n rows."""
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
        if HAS_RES:
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + rows, mask=row_ok).to(tl.float32)
        tl.store(out_ptr + tl.program_id(1) * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _gemv_reduce_kernel(ws_ptr, out_ptr, bias_ptr, res_ptr, N, split_k, HAS_BIAS: tl.constexpr,
                            HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        """out[rows] = sum over s = 0, 1, ... of ws[s, rows] (+ bias), in that order (+ res, as _gemv_kernel)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, split_k):
            y += tl.load(ws_ptr + s * N + rows, mask=ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + rows, mask=ok).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=ok)


    @triton.jit
    def _norm_rstd(x_ptr, K, eps, HAS_NORM: tl.constexpr, KPOW: tl.constexpr):
        """RMSNorm's 1 / sqrt(mean(x^2) + eps) in fp32, the row in one block as `_rmsnorm_kernel` sums it (1.0
        without a norm)."""
        if HAS_NORM:
            cols = tl.arange(0, KPOW)
            xf = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            return tl.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)
        return 1.0

    @triton.jit
    def _x_cols(x_ptr, nw_ptr, cols, col_ok, rstd, HAS_NORM: tl.constexpr):
        """x's columns in fp32; with a norm, RMSNorm's output there with torch's roundings: (x * rstd) to x's
        dtype, times the norm's weight (x's dtype too), rounded again."""
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        if HAS_NORM:
            h = (x.to(tl.float32) * rstd).to(x.dtype)
            nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0)
            return (nw.to(tl.float32) * h.to(tl.float32)).to(x.dtype).to(tl.float32)
        return x.to(tl.float32)

    @triton.jit
    def _row_dot(x_ptr, w_ptr, row, K, stride_wn, nw_ptr, rstd, HAS_NORM: tl.constexpr, BLOCK_K: tl.constexpr):
        """(1,) fp32: W[row] . x (x normalized first with HAS_NORM), BLOCK_K columns a step, as _gemv_kernel sums
        one row (block_n 1, no split)."""
        w_row = w_ptr + row.to(tl.int64) * stride_wn
        acc = tl.zeros((1, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            xv = _x_cols(x_ptr, nw_ptr, cols, col_ok, rstd, HAS_NORM)
            w = tl.load(w_row + cols[None, :], mask=col_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * xv[None, :]
        return tl.sum(acc, axis=1)

    @triton.jit
    def _row_out(x_ptr, w_ptr, out_ptr, bias_ptr, row, K, stride_wn, nw_ptr, rstd, HAS_NORM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
        y = _row_dot(x_ptr, w_ptr, row, K, stride_wn, nw_ptr, rstd, HAS_NORM, BLOCK_K)
        one = tl.arange(0, 1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + row + one).to(tl.float32)
        tl.store(out_ptr + row + one, y.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _gemv_many_kernel(x_ptr, w0, w1, w2, o0, o1, o2, b0, b1, b2, n0, n1, K, s0, s1, s2, nw_ptr, eps,
                          HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, KPOW: tl.constexpr):
        """Program r: row r of [W0; W1; W2] . x (x RMS-normalized first with HAS_NORM), written to the output of
        the weight the row belongs to."""
        r = tl.program_id(0)
        rstd = _norm_rstd(x_ptr, K, eps, HAS_NORM, KPOW)
        if r < n0:
            _row_out(x_ptr, w0, o0, b0, r, K, s0, nw_ptr, rstd, HAS_NORM, HAS_BIAS, BLOCK_K)
        elif r < n0 + n1:
            _row_out(x_ptr, w1, o1, b1, r - n0, K, s1, nw_ptr, rstd, HAS_NORM, HAS_BIAS, BLOCK_K)
        else:
            _row_out(x_ptr, w2, o2, b2, r - n0 - n1, K, s2, nw_ptr, rstd, HAS_NORM, HAS_BIAS, BLOCK_K)

    @triton.jit
    def _gemv_silu_mul_kernel(x_ptr, wg_ptr, wu_ptr, out_ptr, K, stride_g, stride_u, nw_ptr, eps,
                              HAS_NORM: tl.constexpr, BLOCK_K: tl.constexpr, KPOW: tl.constexpr):
        """Program r: silu(Wg[r] . x) * (Wu[r] . x), with torch's roundings to the output dtype in between (each
        projection, the SiLU, the product; x RMS-normalized first with HAS_NORM); both rows in one loop."""
        r = tl.program_id(0)
        rstd = _norm_rstd(x_ptr, K, eps, HAS_NORM, KPOW)
        g_row = wg_ptr + r.to(tl.int64) * stride_g
        u_row = wu_ptr + r.to(tl.int64) * stride_u
        acc_g = tl.zeros((1, BLOCK_K), dtype=tl.float32)
        acc_u = tl.zeros((1, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = cols < K
            xv = _x_cols(x_ptr, nw_ptr, cols, ok, rstd, HAS_NORM)[None, :]
            g = tl.load(g_row + cols[None, :], mask=ok[None, :], other=0.0, eviction_policy="evict_first")
            u = tl.load(u_row + cols[None, :], mask=ok[None, :], other=0.0, eviction_policy="evict_first")
            acc_g += g.to(tl.float32) * xv
            acc_u += u.to(tl.float32) * xv
        dt = out_ptr.dtype.element_ty
        g1 = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
        u1 = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
        s = (g1 / (1.0 + tl.exp(-g1))).to(dt).to(tl.float32)  # torch's silu: x / (1 + exp(-x)) in fp32
        tl.store(out_ptr + r + tl.arange(0, 1), (s * u1).to(dt))

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
                residual: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
                split_k: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """`gemv_ref` for one token in one launch (two with split_k > 1). x: (..., K), leading dims multiplying to 1;
    weight: (N, K) with unit column stride; bias: (N,) or None. Returns (..., N) in x.dtype. residual (N values,
    x.dtype, contiguous): returns `gemv_ref(x, weight, bias) + residual` with torch's two roundings, the add
    fused into the store (a decoder layer's residual connection). Configs left as None come from `gemv_config`;
    block sizes must be powers of two; split_k may shrink (`split_plan`). No host sync."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"gemv: x (..., K) and weight (N, K); got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, k = weight.shape
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"gemv: bias must be ({n},), got {tuple(bias.shape)}")
    if residual is not None and (residual.numel() != n or residual.dtype != x.dtype or not residual.is_contiguous()):
        raise ValueError(f"gemv: residual must be {n} contiguous {x.dtype} values, got {tuple(residual.shape)} "
                         f"{residual.dtype} (contiguous {residual.is_contiguous()})")
    x1 = _token_vector(x, k, "gemv_triton")
    check_triton_inputs(x1, weight, *([] if bias is None else [bias]), *([] if residual is None else [residual]))
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
        _gemv_kernel[grid](x1, weight, out, bias if bias is not None else out, out if residual is None else residual,
                           n, k, weight.stride(0), k_per_split, HAS_BIAS=bias is not None,
                           HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
        return out
    ws = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[grid](x1, weight, ws, ws, ws, n, k, weight.stride(0), k_per_split,
                       HAS_BIAS=False, HAS_RES=False, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    _gemv_reduce_kernel[(triton.cdiv(n, 1024),)](ws, out, bias if bias is not None else out,
                                                 out if residual is None else residual, n, splits,
                                                 HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                                                 BLOCK=1024, num_warps=4)
    return out


def _token_vector(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.dim() < 1 or x.shape[-1] != k or math.prod(x.shape[:-1]) != 1:
        raise ValueError(f"{what} takes one token of {k} features: x (..., {k}) with leading dims multiplying to 1, "
                         f"got {tuple(x.shape)}")
    return x.reshape(k).contiguous()


def _norm_args(x: torch.Tensor, k: int, norm, what: str) -> tuple:
    """(norm weight or x, eps, HAS_NORM, KPOW) for a kernel that RMS-normalizes x first (norm: (weight, eps))."""
    if norm is None:
        return x, 0.0, False, 16
    w, eps = norm
    if tuple(w.shape) != (k,) or w.dtype != x.dtype or not w.is_contiguous() or k > 16384:
        raise ValueError(f"{what}: norm weight ({k},) contiguous {x.dtype} (K <= 16384), got {tuple(w.shape)} "
                         f"{w.dtype}")
    return w, float(eps), True, next_pow2(k)


def rmsnorm_rows_ref(x: torch.Tensor, norm) -> torch.Tensor:
    """x through RMSNorm first when norm = (weight, eps) is given (`rmsnorm_ref`, Llama's formula), else x."""
    from .rmsnorm import rmsnorm_ref
    return x if norm is None else rmsnorm_ref(x, norm[0], norm[1])


def gemv_many_triton(x: torch.Tensor, weights: list, biases: list | None = None, norm=None) -> list:
    """[gemv_ref(x, w, b) for each weight] for one token in ONE launch: 2 or 3 weights (N_i, K) of one dtype with
    unit column stride (a layer's q/k/v projections), biases all given or all None. One program per output row,
    each row summed as `gemv_triton`'s default config sums it (block_n 1, no split, so where that config does
    not split K the results are the same bits); no weight is copied or concatenated. norm = (weight, eps): x goes
    through the layer's RMSNorm first, in every program (`rmsnorm_rows_ref`; the norm's own launch saved). No
    host sync."""
    if len(weights) not in (2, 3) or any(w.dim() != 2 or w.stride(-1) != 1 or w.dtype != weights[0].dtype
                                         or w.shape[1] != weights[0].shape[1] for w in weights):
        raise ValueError("gemv_many_triton: 2 or 3 weights (N_i, K) of one K and dtype with unit column stride, got "
                         f"{[(tuple(w.shape), w.dtype, w.stride()) for w in weights]}")
    biases = list(biases) if biases is not None else [None] * len(weights)
    has_bias = biases[0] is not None
    if len(biases) != len(weights) or any((b is not None) != has_bias for b in biases) or (
            has_bias and any(tuple(b.shape) != (w.shape[0],) for b, w in zip(biases, weights))):
        raise ValueError("gemv_many_triton: a bias (N_i,) for every weight, or none")
    k = weights[0].shape[1]
    x1 = _token_vector(x, k, "gemv_many_triton")
    check_triton_inputs(x1, *weights, *(biases if has_bias else []))
    nw, eps, has_norm, kpow = _norm_args(x1, k, norm, "gemv_many_triton")
    outs = [torch.empty(x.shape[:-1] + (w.shape[0],), dtype=x.dtype, device=x.device) for w in weights]
    ws, os_, bs = (weights + weights[-1:])[:3], (outs + outs[-1:])[:3], ((biases if has_bias else outs) * 2)[:3]
    rows = sum(w.shape[0] for w in weights)
    if rows:
        block_k = gemv_config(weights[0].shape[0], k, 1)["block_k"]
        _gemv_many_kernel[(rows,)](x1, *ws, *os_, *bs, ws[0].shape[0], ws[1].shape[0], k,
                                   *(w.stride(0) for w in ws), nw, eps, HAS_NORM=has_norm, HAS_BIAS=has_bias,
                                   BLOCK_K=block_k, KPOW=kpow, num_warps=4)
    return outs


def silu_mul_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """A Llama MLP's input to its down projection, `act_fn(gate_proj(x)) * up_proj(x)` with SiLU, each linear
    summed in fp32 (`gemv_ref`) and every step rounded to x.dtype as torch rounds it."""
    return torch.nn.functional.silu(gemv_ref(x, w_gate)) * gemv_ref(x, w_up)


def gemv_silu_mul_triton(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, norm=None) -> torch.Tensor:
    """`silu_mul_ref` for one token in one launch (no bias): program r reads row r of both weights (I, K) and
    writes one of the (..., I) outputs; the gate and up projections and the SiLU never reach memory. norm =
    (weight, eps): x goes through RMSNorm first, as in `gemv_many_triton`. No sync."""
    if w_gate.dim() != 2 or w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype or \
            w_gate.stride(-1) != 1 or w_up.stride(-1) != 1:
        raise ValueError("gemv_silu_mul_triton: gate and up weights (I, K) of one shape and dtype, unit column "
                         f"stride; got {tuple(w_gate.shape)} {w_gate.dtype} and {tuple(w_up.shape)} {w_up.dtype}")
    n, k = w_gate.shape
    x1 = _token_vector(x, k, "gemv_silu_mul_triton")
    check_triton_inputs(x1, w_gate, w_up)
    nw, eps, has_norm, kpow = _norm_args(x1, k, norm, "gemv_silu_mul_triton")
    out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    if n:
        _gemv_silu_mul_kernel[(n,)](x1, w_gate, w_up, out, k, w_gate.stride(0), w_up.stride(0), nw, eps,
                                    HAS_NORM=has_norm, BLOCK_K=gemv_config(n, k, 1)["block_k"], KPOW=kpow,
                                    num_warps=4)
    return out
