"""One decode step of attention over a KIVI-quantized layer (methods/kivi.py), dequantizing inside the tile.

Layout (one layer, batch 1, heads back to back, as `KIVILayer.flat()` builds it): per KV head h, row i of
n_h rows has its key quantized if i < nkq[h] (codes in `kq_codes` row kq_start[h] + i, packed 8 // bits per
byte; per-channel scale / minimum of its group of G rows at row (kq_start[h] + i) // G of `kq_scale` / `kq_min`;
every head's quantized key rows start at a multiple of G), else in full precision at row kr_start[h] + i - nkq[h]
of `kr`. Values alike with nvq / vq_* / vr, but per token: scale / minimum of channel c at (row, c // G).

The split kernel is ragged_decode's split-K flash-decoding with the key and value tiles dequantized in
registers (x = code * scale + minimum), so the full-precision cache is never materialized; its partial
results are merged by ragged_decode's reduce kernel.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_triton_inputs, group_size, next_pow2, num_programs_hint, resolve_scaling
from .colsum import LOG2E, _dot_precision

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .ragged_decode import _decode_reduce_kernel

    @triton.jit
    def _kivi_split_kernel(q_ptr, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr, vr_ptr,
                           meta_ptr, work_ptr, stride_qh, G, D, scale_log2,
                           BITS: tl.constexpr, QG: tl.constexpr, NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr,
                           D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # grid: (n_kv, NUM_SPLITS); meta rows: n, kq_start, nkq, kr_start, vq_start, nvq, vr_start (per head)
        h = tl.program_id(0)
        split = tl.program_id(1)
        n = tl.load(meta_ptr + h * 7)
        kq_start = tl.load(meta_ptr + h * 7 + 1)
        nkq = tl.load(meta_ptr + h * 7 + 2)
        kr_start = tl.load(meta_ptr + h * 7 + 3)
        vq_start = tl.load(meta_ptr + h * 7 + 4)
        nvq = tl.load(meta_ptr + h * 7 + 5)
        vr_start = tl.load(meta_ptr + h * 7 + 6)
        PER: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        DB = D // PER  # packed bytes per row
        chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        byte_col = offs_d // PER
        shift = ((offs_d % PER) * BITS).to(tl.uint8)
        q = tl.load(q_ptr + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=(offs_g < G)[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            rows = n0 + offs_n
            ok = rows < hi
            # keys: quantized rows (per channel: parameters of the row's group of QG rows), then full rows
            kq_ok = ok & (rows < nkq)
            kr_ok = ok & (rows >= nkq)
            qrow = kq_start + rows
            codes = tl.load(kqc_ptr + qrow[:, None] * DB + byte_col[None, :], mask=kq_ok[:, None] & d_ok[None, :],
                            other=0)
            codes = ((codes >> shift[None, :]) & MASK).to(tl.float32)
            grp = qrow // QG
            ks = tl.load(kqs_ptr + grp[:, None] * D + offs_d[None, :], mask=kq_ok[:, None] & d_ok[None, :], other=0.0)
            km = tl.load(kqm_ptr + grp[:, None] * D + offs_d[None, :], mask=kq_ok[:, None] & d_ok[None, :], other=0.0)
            kf = tl.load(kr_ptr + (kr_start + rows - nkq)[:, None] * D + offs_d[None, :],
                         mask=kr_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.where(kq_ok[:, None], codes * ks.to(tl.float32) + km.to(tl.float32), kf.to(tl.float32))
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # values: quantized rows (per token: parameters of channel group c // QG), then full rows
            vq_ok = ok & (rows < nvq)
            vr_ok = ok & (rows >= nvq)
            vrow = vq_start + rows
            vcodes = tl.load(vqc_ptr + vrow[:, None] * DB + byte_col[None, :], mask=vq_ok[:, None] & d_ok[None, :],
                             other=0)
            vcodes = ((vcodes >> shift[None, :]) & MASK).to(tl.float32)
            NGV = D // QG
            vs = tl.load(vqs_ptr + vrow[:, None] * NGV + (offs_d // QG)[None, :], mask=vq_ok[:, None] & d_ok[None, :],
                         other=0.0)
            vm = tl.load(vqm_ptr + vrow[:, None] * NGV + (offs_d // QG)[None, :], mask=vq_ok[:, None] & d_ok[None, :],
                         other=0.0)
            vf = tl.load(vr_ptr + (vr_start + rows - nvq)[:, None] * D + offs_d[None, :],
                         mask=vr_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.where(vq_ok[:, None], vcodes * vs.to(tl.float32) + vm.to(tl.float32), vf.to(tl.float32))
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
            m_i = m_new
        base = ((h * G + offs_g) * NUM_SPLITS + split) * (D_PAD + 2)
        g_ok = offs_g < G
        tl.store(work_ptr + base, m_i, mask=g_ok)
        tl.store(work_ptr + base + 1, l_i, mask=g_ok)
        tl.store(work_ptr + base[:, None] + 2 + offs_d[None, :], acc, mask=g_ok[:, None])


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.stack([(codes >> (bits * j)) & mask for j in range(per)], dim=-1).view(codes.shape[0], codes.shape[1] * per)


def kivi_decode_attention_ref(q: torch.Tensor, flat: dict, scaling: float | None = None) -> torch.Tensor:
    """Torch reference over the flat layout (module docstring): dequantize each head's rows in float32, then
    a full softmax of its g query heads. q (n_q, d) -> (n_q, d) in q's dtype."""
    bits, G = flat["bits"], flat["group_size"]
    meta = flat["meta"].tolist()
    g = group_size(q.shape[0], len(meta))
    d = q.shape[1]
    scaling = resolve_scaling(scaling, d)
    out = torch.zeros_like(q)
    for h, (n, kqs, nkq, krs, vqs, nvq, vrs) in enumerate(meta):
        if n == 0:
            continue
        kc = _unpack(flat["kq_codes"][kqs:kqs + nkq], bits).float()
        grp = torch.arange(kqs, kqs + nkq) // G
        k = torch.cat([kc * flat["kq_scale"][grp].float() + flat["kq_min"][grp].float(),
                       flat["kr"][krs:krs + n - nkq].float()])
        vc = _unpack(flat["vq_codes"][vqs:vqs + nvq], bits).float().view(nvq, d // G, G)
        v = (vc * flat["vq_scale"][vqs:vqs + nvq].float().unsqueeze(-1)
             + flat["vq_min"][vqs:vqs + nvq].float().unsqueeze(-1)).view(nvq, d)
        v = torch.cat([v, flat["vr"][vrs:vrs + n - nvq].float()])
        p = torch.softmax(q[h * g:(h + 1) * g].float() @ k.T * scaling, dim=-1)
        out[h * g:(h + 1) * g] = (p @ v).to(q.dtype)
    return out


def kivi_decode_attention_triton(q: torch.Tensor, flat: dict, scaling: float | None = None,
                                 num_splits: int | None = None, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """Triton version of `kivi_decode_attention_ref` (same arguments and result); no host sync."""
    meta = flat["meta"]
    tensors = [flat[k] for k in ("kq_codes", "kq_scale", "kq_min", "kr", "vq_codes", "vq_scale", "vq_min", "vr")]
    check_triton_inputs(q, meta, *tensors)
    n_kv = meta.shape[0]
    g = group_size(q.shape[0], n_kv)
    n_q, d = q.shape
    dtype = flat["kr"].dtype
    out_dtype = q.dtype
    q = q.to(dtype).contiguous()
    if num_splits is None:
        avg_rows = max(1, int(flat["rows"]) // max(n_kv, 1))
        num_splits = max(1, min(triton.cdiv(avg_rows, 2 * block_n),
                                triton.cdiv(num_programs_hint(q.device) // 2, n_kv)))
    d_pad = max(16, next_pow2(d))
    work = torch.empty(n_q, num_splits, d_pad + 2, device=q.device, dtype=torch.float32)
    _kivi_split_kernel[(n_kv, num_splits)](
        q, *tensors, meta, work, q.stride(0), g, d, resolve_scaling(scaling, d) * LOG2E,
        BITS=flat["bits"], QG=flat["group_size"], NUM_SPLITS=num_splits, G_PAD=max(16, next_pow2(g)), D_PAD=d_pad,
        BLOCK_N=block_n, DOT_PRECISION=_dot_precision(dtype), num_warps=num_warps)
    out = torch.empty(n_q, d, device=q.device, dtype=out_dtype)
    lse = torch.empty(n_q, device=q.device, dtype=torch.float32)
    _decode_reduce_kernel[(n_q,)](work, out, lse, out.stride(0), d, NUM_SPLITS=num_splits,
                                  S_PAD=next_pow2(num_splits), D_PAD=d_pad, num_warps=num_warps)
    return out


def kivi_decode_attention(q: torch.Tensor, layer, scaling: float | None = None) -> torch.Tensor:
    """Decode attention of q (n_q, d) over a `KIVILayer`: Triton on CUDA, the torch reference elsewhere."""
    from . import use_triton
    flat = layer.flat()
    if use_triton(q, flat["kr"]):
        return kivi_decode_attention_triton(q, flat, scaling)
    return kivi_decode_attention_ref(q, flat, scaling)
