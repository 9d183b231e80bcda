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
    def _unpack_tile(pk, BITS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        """(BLOCK_N, D // (8 // BITS)) packed bytes -> (BLOCK_N, D) codes: the bytes are loaded whole (wide,
        coalesced loads), then split in registers; code j of byte b is column b * (8 // BITS) + j."""
        if BITS == 8:
            return pk
        elif BITS == 4:
            return tl.reshape(tl.join(pk & 15, pk >> 4), (BLOCK_N, D))
        else:
            # join(join(c0, c2), join(c1, c3))[b, i, k] = c_{2i + k}: flattened, column b * 4 + 2i + k
            return tl.reshape(tl.join(tl.join(pk & 3, (pk >> 4) & 3), tl.join((pk >> 2) & 3, pk >> 6)), (BLOCK_N, D))

    @triton.jit
    def _kivi_tile(q, m_i, l_i, acc, rows, ok, n0, kq_start, nkq, kr_start, vq_start, nvq, vr_start,
                   kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr, vr_ptr, scale_log2,
                   offs_d, KEY_Q: tl.constexpr, VAL_Q: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One tile of BLOCK_N rows of one head whose keys are all quantized (KEY_Q) or all full precision,
        values alike: no tile ever loads both forms, so few tiles are live at once (registers, not spills)."""
        DB: tl.constexpr = D // (8 // BITS)
        NGV: tl.constexpr = D // QG
        offs_b = tl.arange(0, DB)
        if KEY_Q:
            # the tile lies inside one group of QG rows (aligned, BLOCK_N divides QG): one scale/min vector
            grp = (kq_start + n0) // QG
            ks = tl.load(kqs_ptr + grp * D + offs_d).to(tl.float32)
            km = tl.load(kqm_ptr + grp * D + offs_d).to(tl.float32)
            pk = tl.load(kqc_ptr + (kq_start + rows)[:, None] * DB + offs_b[None, :], mask=ok[:, None], other=0)
            k = _unpack_tile(pk, BITS, BLOCK_N, D).to(tl.float32) * ks[None, :] + km[None, :]
        else:
            k = tl.load(kr_ptr + (kr_start + rows - nkq)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if VAL_Q:
            vrow = vq_start + rows
            offs_g = tl.arange(0, NGV)
            vs = tl.load(vqs_ptr + vrow[:, None] * NGV + offs_g[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            vm = tl.load(vqm_ptr + vrow[:, None] * NGV + offs_g[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            # a token's channel-group parameters, repeated over the group's QG channels
            vs = tl.reshape(tl.broadcast_to(vs[:, :, None], (BLOCK_N, NGV, QG)), (BLOCK_N, D))
            vm = tl.reshape(tl.broadcast_to(vm[:, :, None], (BLOCK_N, NGV, QG)), (BLOCK_N, D))
            pv = tl.load(vqc_ptr + vrow[:, None] * DB + offs_b[None, :], mask=ok[:, None], other=0)
            v = _unpack_tile(pv, BITS, BLOCK_N, D).to(tl.float32) * vs + vm
        else:
            v = tl.load(vr_ptr + (vr_start + rows - nvq)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _kivi_split_kernel(q_ptr, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr, vr_ptr,
                           meta_ptr, work_ptr, stride_qh, G, scale_log2,
                           BITS: tl.constexpr, QG: tl.constexpr, NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr,
                           D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
        chunk = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :], mask=(offs_g < G)[:, None],
                    other=0.0)
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        # rows in three runs, in order (KIVI: nvq <= nkq): both quantized [0, a), quantized key + full value
        # [a, b), both full [b, n). Tiles stay aligned to BLOCK_N from the head's start (one key group each).
        a = tl.minimum(nvq, nkq)
        b = tl.maximum(nvq, nkq)
        k_first = nkq >= nvq  # the middle run: quantized keys (KIVI) or, never in KIVI, quantized values
        seg_hi = tl.minimum(hi, a)
        for n0 in range(lo, seg_hi, BLOCK_N):
            rows = n0 + offs_n
            m_i, l_i, acc = _kivi_tile(q, m_i, l_i, acc, rows, rows < seg_hi, n0, kq_start, nkq, kr_start,
                                       vq_start, nvq, vr_start, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr,
                                       vqm_ptr, vr_ptr, scale_log2, offs_d,
                                       True, True, BITS, QG, BLOCK_N, D, DOT_PRECISION)
        seg_lo = tl.maximum(lo, a)
        seg_hi = tl.minimum(hi, b)
        start = lo + ((seg_lo - lo) // BLOCK_N) * BLOCK_N
        for n0 in range(start, seg_hi, BLOCK_N):
            rows = n0 + offs_n
            ok = (rows >= seg_lo) & (rows < seg_hi)
            if k_first:
                m_i, l_i, acc = _kivi_tile(q, m_i, l_i, acc, rows, ok, n0, kq_start, nkq, kr_start, vq_start, nvq,
                                           vr_start, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr,
                                           vr_ptr, scale_log2, offs_d,
                                           True, False, BITS, QG, BLOCK_N, D, DOT_PRECISION)
            else:
                m_i, l_i, acc = _kivi_tile(q, m_i, l_i, acc, rows, ok, n0, kq_start, nkq, kr_start, vq_start, nvq,
                                           vr_start, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr,
                                           vr_ptr, scale_log2, offs_d,
                                           False, True, BITS, QG, BLOCK_N, D, DOT_PRECISION)
        seg_lo = tl.maximum(lo, b)
        start = lo + ((seg_lo - lo) // BLOCK_N) * BLOCK_N
        for n0 in range(start, hi, BLOCK_N):
            rows = n0 + offs_n
            ok = (rows >= seg_lo) & (rows < hi)
            m_i, l_i, acc = _kivi_tile(q, m_i, l_i, acc, rows, ok, n0, kq_start, nkq, kr_start, vq_start, nvq,
                                       vr_start, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr,
                                       vr_ptr, scale_log2, offs_d,
                                       False, False, BITS, QG, BLOCK_N, D, DOT_PRECISION)
        base = ((h * G + offs_g) * NUM_SPLITS + split) * (D + 2)
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
                                 num_splits: int | None = None, block_n: int | None = None,
                                 num_warps: int = 4) -> torch.Tensor:
    """Triton version of `kivi_decode_attention_ref` (same arguments and result); no host sync. block_n must
    divide the key group size (a tile's keys then share one scale/min vector); default min(64, group)."""
    G_q = flat["group_size"]
    block_n = min(64, G_q) if block_n is None else block_n
    if G_q % block_n or block_n < 16:
        raise ValueError(f"block_n={block_n}; allowed: a divisor of the group size {G_q}, >= 16")
    if q.shape[1] != next_pow2(q.shape[1]) or q.shape[1] < 16:
        raise ValueError(f"head dim {q.shape[1]}; the KIVI kernel needs a power of two >= 16 (use the reference)")
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
    d_pad = d
    work = torch.empty(n_q, num_splits, d_pad + 2, device=q.device, dtype=torch.float32)
    _kivi_split_kernel[(n_kv, num_splits)](
        q, *tensors, meta, work, q.stride(0), g, resolve_scaling(scaling, d) * LOG2E,
        BITS=flat["bits"], QG=flat["group_size"], NUM_SPLITS=num_splits, G_PAD=max(16, next_pow2(g)), D=d,
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
