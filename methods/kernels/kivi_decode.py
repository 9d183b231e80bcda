"""One decode step of attention over a KIVI-quantized layer (methods/kivi.py), dequantizing inside the tile.

Layout (one layer, batch 1, heads back to back, as `KIVILayer.flat()` builds it): per KV head h, row i of
n_h rows has its key quantized if i < nkq[h] (codes in `kq_codes` row kq_start[h] + i, packed 8 // bits per
byte; per-channel scale / minimum of its group of G rows at row (kq_start[h] + i) // G of `kq_scale` / `kq_min`;
every head's quantized key rows start at a multiple of G), else in full precision at row kr_start[h] + i - nkq[h]
of `kr`. Values alike with nvq / vq_* / vr, but per token: scale / minimum of channel c at (row, c // G). Keys
per token (`key_per_channel` False: FlexGen's format) have their parameters as values do.

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
    def _per_token_rows(qrow, ok, qc_ptr, qs_ptr, qm_ptr, BITS: tl.constexpr, QG: tl.constexpr,
                        BLOCK_N: tl.constexpr, D: tl.constexpr):
        """Rows quantized per token (groups of QG channels), dequantized in float32: (BLOCK_N, D)."""
        DB: tl.constexpr = D // (8 // BITS)
        NGV: tl.constexpr = D // QG
        offs_b = tl.arange(0, DB)
        offs_g = tl.arange(0, NGV)
        vs = tl.load(qs_ptr + qrow[:, None] * NGV + offs_g[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        vm = tl.load(qm_ptr + qrow[:, None] * NGV + offs_g[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        # a token's channel-group parameters, repeated over the group's QG channels
        vs = tl.reshape(tl.broadcast_to(vs[:, :, None], (BLOCK_N, NGV, QG)), (BLOCK_N, D))
        vm = tl.reshape(tl.broadcast_to(vm[:, :, None], (BLOCK_N, NGV, QG)), (BLOCK_N, D))
        pv = tl.load(qc_ptr + qrow[:, None] * DB + offs_b[None, :], mask=ok[:, None], other=0)
        return _unpack_tile(pv, BITS, BLOCK_N, D).to(tl.float32) * vs + vm

    @triton.jit
    def _kivi_tile(q, m_i, l_i, acc, rows, ok, n0, kq_start, nkq, kr_start, vq_start, nvq, vr_start,
                   kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr, vr_ptr, scale_log2,
                   offs_d, KEY_Q: tl.constexpr, VAL_Q: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr, KEY_PC: tl.constexpr):
        """One tile of BLOCK_N rows of one head whose keys are all quantized (KEY_Q) or all full precision,
        values alike: no tile ever loads both forms, so few tiles are live at once (registers, not spills).
        KEY_PC: keys quantized per channel (KIVI), else per token (FlexGen)."""
        DB: tl.constexpr = D // (8 // BITS)
        offs_b = tl.arange(0, DB)
        if KEY_Q:
            if KEY_PC:
                # the tile lies inside one group of QG rows (aligned, BLOCK_N divides QG): one scale/min vector
                grp = (kq_start + n0) // QG
                ks = tl.load(kqs_ptr + grp * D + offs_d).to(tl.float32)
                km = tl.load(kqm_ptr + grp * D + offs_d).to(tl.float32)
                pk = tl.load(kqc_ptr + (kq_start + rows)[:, None] * DB + offs_b[None, :], mask=ok[:, None], other=0)
                k = _unpack_tile(pk, BITS, BLOCK_N, D).to(tl.float32) * ks[None, :] + km[None, :]
            else:
                k = _per_token_rows(kq_start + rows, ok, kqc_ptr, kqs_ptr, kqm_ptr, BITS, QG, BLOCK_N, D)
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
            v = _per_token_rows(vq_start + rows, ok, vqc_ptr, vqs_ptr, vqm_ptr, BITS, QG, BLOCK_N, D)
        else:
            v = tl.load(vr_ptr + (vr_start + rows - nvq)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _head_meta(meta_ptr, h):
        """Head h's row of the layout's meta: n, kq_start, nkq, kr_start, vq_start, nvq, vr_start."""
        return (tl.load(meta_ptr + h * 7), tl.load(meta_ptr + h * 7 + 1), tl.load(meta_ptr + h * 7 + 2),
                tl.load(meta_ptr + h * 7 + 3), tl.load(meta_ptr + h * 7 + 4), tl.load(meta_ptr + h * 7 + 5),
                tl.load(meta_ptr + h * 7 + 6))

    @triton.jit
    def _kivi_split_kernel(q_ptr, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr, vr_ptr,
                           meta_ptr, work_ptr, stride_qh, G, scale_log2,
                           BITS: tl.constexpr, QG: tl.constexpr, NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr,
                           D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           KEY_PC: tl.constexpr):
        # grid: (n_kv, NUM_SPLITS); meta rows: n, kq_start, nkq, kr_start, vq_start, nvq, vr_start (per head)
        h = tl.program_id(0)
        split = tl.program_id(1)
        n, kq_start, nkq, kr_start, vq_start, nvq, vr_start = _head_meta(meta_ptr, h)
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
                                       True, True, BITS, QG, BLOCK_N, D, DOT_PRECISION, KEY_PC)
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
                                           True, False, BITS, QG, BLOCK_N, D, DOT_PRECISION, KEY_PC)
            else:
                m_i, l_i, acc = _kivi_tile(q, m_i, l_i, acc, rows, ok, n0, kq_start, nkq, kr_start, vq_start, nvq,
                                           vr_start, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr,
                                           vr_ptr, scale_log2, offs_d,
                                           False, True, BITS, QG, BLOCK_N, D, DOT_PRECISION, KEY_PC)
        seg_lo = tl.maximum(lo, b)
        start = lo + ((seg_lo - lo) // BLOCK_N) * BLOCK_N
        for n0 in range(start, hi, BLOCK_N):
            rows = n0 + offs_n
            ok = (rows >= seg_lo) & (rows < hi)
            m_i, l_i, acc = _kivi_tile(q, m_i, l_i, acc, rows, ok, n0, kq_start, nkq, kr_start, vq_start, nvq,
                                       vr_start, kqc_ptr, kqs_ptr, kqm_ptr, kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr,
                                       vr_ptr, scale_log2, offs_d,
                                       False, False, BITS, QG, BLOCK_N, D, DOT_PRECISION, KEY_PC)
        base = ((h * G + offs_g) * NUM_SPLITS + split) * (D + 2)
        g_ok = offs_g < G
        tl.store(work_ptr + base, m_i, mask=g_ok)
        tl.store(work_ptr + base + 1, l_i, mask=g_ok)
        tl.store(work_ptr + base[:, None] + 2 + offs_d[None, :], acc, mask=g_ok[:, None])


    @triton.jit
    def _pack_rows(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
        """(ROWS, D) integer codes -> (ROWS, D // (8 // BITS)) uint8, code j of a byte in bits [j*BITS, (j+1)*BITS)
        (methods/kivi.py `pack`; the parts are disjoint, so their sum is their bitwise or)."""
        PER: tl.constexpr = 8 // BITS
        c = tl.reshape(codes, (ROWS, D // PER, PER))
        shift = tl.arange(0, PER) * BITS
        return tl.sum(c << shift[None, None, :], axis=2).to(tl.uint8)

    @triton.jit
    def _rounded(x, P_DTYPE: tl.constexpr):
        """float32 -> P_DTYPE to nearest, ties to even, as torch rounds. bfloat16 by hand on the bits (the Triton
        interpreter truncates that cast; on the GPU both give the same bits)."""
        if P_DTYPE == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            return u.to(tl.float32, bitcast=True).to(P_DTYPE)
        else:
            return x.to(P_DTYPE)

    @triton.jit
    def _params(mn, mx, BITS: tl.constexpr, P_DTYPE: tl.constexpr):
        """methods/kivi.py `quantize_groups`, bit for bit: the scale (max - min) / (2^b - 1) (IEEE division,
        `div_rn`) and the minimum, both rounded to the stored dtype."""
        return _rounded(tl.math.div_rn(mx - mn, 2.0 ** BITS - 1.0), P_DTYPE), _rounded(mn, P_DTYPE)

    @triton.jit
    def _codes(x, s, m, BITS: tl.constexpr):
        """round((x - min) / scale) from the stored parameters, half to even (the magic-number add rounds to the
        nearest integer, ties to even), clamped to the code range; 0 where the scale is 0."""
        q = tl.math.div_rn(x - m, tl.where(s > 0, s, 1.0))
        q = (q + 12582912.0) - 12582912.0
        q = tl.where(s > 0, q, 0.0)
        return tl.minimum(tl.maximum(q, 0.0), 2.0 ** BITS - 1.0).to(tl.int32)

    @triton.jit
    def _quantize_token(x, qc_ptr, qs_ptr, qm_ptr, qrow, BITS: tl.constexpr, QG: tl.constexpr, D: tl.constexpr):
        """One row x (D,) quantized per token (groups of QG channels) into quantized row qrow."""
        P_DTYPE: tl.constexpr = qs_ptr.dtype.element_ty
        DB: tl.constexpr = D // (8 // BITS)
        NGV: tl.constexpr = D // QG
        g = tl.reshape(x.to(tl.float32), (NGV, QG))
        scale, mn = _params(tl.min(g, axis=1), tl.max(g, axis=1), BITS, P_DTYPE)
        codes = _codes(g, scale.to(tl.float32)[:, None], mn.to(tl.float32)[:, None], BITS)
        packed = tl.reshape(_pack_rows(tl.reshape(codes, (1, D)), 1, D, BITS), (DB,))
        tl.store(qc_ptr + qrow * DB + tl.arange(0, DB), packed)
        offs_g = tl.arange(0, NGV)
        tl.store(qs_ptr + qrow * NGV + offs_g, scale)
        tl.store(qm_ptr + qrow * NGV + offs_g, mn)

    @triton.jit
    def _push_token(x, r_ptr, r_start, nr, q_start, nq, qc_ptr, qs_ptr, qm_ptr, R: tl.constexpr, BITS: tl.constexpr,
                    QG: tl.constexpr, D: tl.constexpr):
        """x joins a full-precision run of nr rows at r_start; once more than R are held, its oldest is quantized
        per token (the new row itself when R = 0: taken from registers, not read back) and the run starts one row
        later. Returns the new (quantized count, run start)."""
        offs_d = tl.arange(0, D)
        old = tl.load(r_ptr + r_start * D + offs_d)  # read before the store below (nr = 0: that same row)
        tl.store(r_ptr + (r_start + nr) * D + offs_d, x)
        if nr + 1 > R:
            _quantize_token(tl.where(nr > 0, old, x), qc_ptr, qs_ptr, qm_ptr, q_start + nq, BITS, QG, D)
            nq += 1
            r_start += 1
        return nq, r_start

    @triton.jit
    def _kivi_append_kernel(k_ptr, v_ptr, pos_ptr, meta_ptr, pstart_ptr, positions_ptr, kqc_ptr, kqs_ptr, kqm_ptr,
                            kr_ptr, vqc_ptr, vqs_ptr, vqm_ptr, vr_ptr,
                            R: tl.constexpr, QG: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr,
                            KEY_PC: tl.constexpr):
        # grid: (n_kv,). One head's token: its key into the full-precision run, or, when that run reaches R,
        # all R keys quantized per channel (groups of QG rows; KEY_PC, KIVI) — per-token keys (FlexGen) go as
        # values do; its value into the full-precision run, whose oldest row is quantized per token once more
        # than R are held (the layout of the module docstring)
        h = tl.program_id(0)
        P_DTYPE: tl.constexpr = kqs_ptr.dtype.element_ty
        DB: tl.constexpr = D // (8 // BITS)
        n, kq_start, nkq, kr_start, vq_start, nvq, vr_start = _head_meta(meta_ptr, h)
        offs_d = tl.arange(0, D)
        offs_b = tl.arange(0, DB)
        k = tl.load(k_ptr + h * D + offs_d)
        v = tl.load(v_ptr + h * D + offs_d)
        tl.store(positions_ptr + tl.load(pstart_ptr + h) + n, tl.load(pos_ptr))
        nkr = n - nkq
        nvr = n - nvq
        if KEY_PC:
            if nkr + 1 == R:  # the R-th full-precision key: the R rows (the new one from registers) are quantized
                rows = tl.arange(0, R)
                kt = tl.load(kr_ptr + (kr_start + rows)[:, None] * D + offs_d[None, :],
                             mask=(rows < R - 1)[:, None], other=0.0)
                kt = tl.where((rows == R - 1)[:, None], k[None, :], kt).to(tl.float32)
                g = tl.reshape(kt, (R // QG, QG, D))
                scale, mn = _params(tl.min(g, axis=1), tl.max(g, axis=1), BITS, P_DTYPE)
                codes = _codes(g, scale.to(tl.float32)[:, None, :], mn.to(tl.float32)[:, None, :], BITS)
                packed = _pack_rows(tl.reshape(codes, (R, D)), R, D, BITS)
                tl.store(kqc_ptr + (kq_start + nkq + rows)[:, None] * DB + offs_b[None, :], packed)
                grp = (kq_start + nkq) // QG + tl.arange(0, R // QG)
                tl.store(kqs_ptr + grp[:, None] * D + offs_d[None, :], scale)
                tl.store(kqm_ptr + grp[:, None] * D + offs_d[None, :], mn)
                nkq += R
            else:
                tl.store(kr_ptr + (kr_start + nkr) * D + offs_d, k)
        else:
            nkq, kr_start = _push_token(k, kr_ptr, kr_start, nkr, kq_start, nkq, kqc_ptr, kqs_ptr, kqm_ptr, R, BITS,
                                        QG, D)
        nvq, vr_start = _push_token(v, vr_ptr, vr_start, nvr, vq_start, nvq, vqc_ptr, vqs_ptr, vqm_ptr, R, BITS, QG, D)
        tl.store(meta_ptr + h * 7, n + 1)
        tl.store(meta_ptr + h * 7 + 2, nkq)
        tl.store(meta_ptr + h * 7 + 3, kr_start)
        tl.store(meta_ptr + h * 7 + 5, nvq)
        tl.store(meta_ptr + h * 7 + 6, vr_start)


def kivi_append_ref(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, flat: dict) -> None:
    """Append one token to every KV head of a device layout (`KIVILayer.device_begin`: the flat layout with
    capacity, `positions` / `pos_start`, and `residual` R), as `KIVILayer.append` does: the key joins the
    full-precision run, which is quantized per channel once it holds R (keys per token: as values); the value
    joins its run, whose oldest row is quantized per token once it holds more than R. k, v (n_kv, d); pos (1,)
    int64. Updates `meta` in place."""
    from kvbench.methods.kivi import pack, quantize_groups
    bits, G, R = flat["bits"], flat["group_size"], flat["residual"]
    meta = flat["meta"]
    dt = flat["kr"].dtype
    for h, ((n, kqs, nkq, krs, vqs, nvq, vrs), ps) in enumerate(zip(meta.tolist(), flat["pos_start"].tolist())):
        nkr, nvr = n - nkq, n - nvq
        flat["positions"][ps + n] = pos.reshape(())
        if not flat["key_per_channel"]:  # keys per token (FlexGen): as values
            nkq, krs = _push_token_ref(k[h], "k", krs, nkr, kqs, nkq, flat)
        elif nkr + 1 == R:
            codes, scale, mn = quantize_groups(torch.cat([flat["kr"][krs:krs + nkr], k[h:h + 1].to(dt)]), bits, G, 0, dt)
            flat["kq_codes"][kqs + nkq:kqs + nkq + R] = pack(codes, bits)
            r0 = (kqs + nkq) // G
            flat["kq_scale"][r0:r0 + R // G] = scale
            flat["kq_min"][r0:r0 + R // G] = mn
            nkq += R
        else:
            flat["kr"][krs + nkr] = k[h].to(dt)
        nvq, vrs = _push_token_ref(v[h], "v", vrs, nvr, vqs, nvq, flat)
        meta[h] = torch.tensor([n + 1, kqs, nkq, krs, vqs, nvq, vrs], dtype=meta.dtype, device=meta.device)


def _push_token_ref(x, kind: str, r_start: int, nr: int, q_start: int, nq: int, flat: dict) -> tuple[int, int]:
    """x joins the full-precision run (`kr` / `vr`) of nr rows at r_start; once more than R are held its oldest
    is quantized per token. Returns the new (quantized count, run start)."""
    from kvbench.methods.kivi import pack, quantize_groups
    r = flat[kind + "r"]
    r[r_start + nr] = x.to(r.dtype)
    if nr + 1 <= flat["residual"]:
        return nq, r_start
    codes, scale, mn = quantize_groups(r[r_start:r_start + 1], flat["bits"], flat["group_size"], 1, r.dtype)
    flat[kind + "q_codes"][q_start + nq] = pack(codes, flat["bits"])[0]
    flat[kind + "q_scale"][q_start + nq] = scale[0]
    flat[kind + "q_min"][q_start + nq] = mn[0]
    return nq + 1, r_start + 1


def kivi_append_triton(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, flat: dict) -> None:
    """Triton version of `kivi_append_ref` (same arguments, same bits); one launch, no host sync."""
    d = k.shape[1]
    dt = flat["kr"].dtype
    k, v = k.to(dt).contiguous(), v.to(dt).contiguous()
    names = ("kq_codes", "kq_scale", "kq_min", "kr", "vq_codes", "vq_scale", "vq_min", "vr")
    check_triton_inputs(k, v, pos, flat["meta"], flat["positions"], *(flat[x] for x in names))
    R = flat["residual"]
    _kivi_append_kernel[(k.shape[0],)](k, v, pos, flat["meta"], flat["pos_start"], flat["positions"],
                                       *(flat[x] for x in names), R=R, QG=flat["group_size"], BITS=flat["bits"],
                                       D=d, KEY_PC=flat["key_per_channel"], num_warps=4 if R * d <= 8192 else 8)


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.stack([(codes >> (bits * j)) & mask for j in range(per)], dim=-1).view(codes.shape[0], codes.shape[1] * per)


def _per_token(flat: dict, kind: str, start: int, n: int) -> torch.Tensor:
    """Rows start .. start + n of the keys' or values' quantized rows (per token), dequantized: (n, d) float32."""
    G = flat["group_size"]
    c = _unpack(flat[kind + "q_codes"][start:start + n], flat["bits"]).float()
    d = c.shape[1]
    c = c.view(n, d // G, G)
    return (c * flat[kind + "q_scale"][start:start + n].float().unsqueeze(-1)
            + flat[kind + "q_min"][start:start + n].float().unsqueeze(-1)).view(n, d)


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
        if flat["key_per_channel"]:
            kc = _unpack(flat["kq_codes"][kqs:kqs + nkq], bits).float()
            grp = torch.arange(kqs, kqs + nkq) // G
            k = kc * flat["kq_scale"][grp].float() + flat["kq_min"][grp].float()
        else:
            k = _per_token(flat, "k", kqs, nkq)
        k = torch.cat([k, flat["kr"][krs:krs + n - nkq].float()])
        v = torch.cat([_per_token(flat, "v", vqs, nvq), flat["vr"][vrs:vrs + n - nvq].float()])
        p = torch.softmax(q[h * g:(h + 1) * g].float() @ k.T * scaling, dim=-1)
        out[h * g:(h + 1) * g] = (p @ v).to(q.dtype)
    return out


def kivi_decode_attention_triton(q: torch.Tensor, flat: dict, scaling: float | None = None,
                                 num_splits: int | None = None, block_n: int | None = None,
                                 num_warps: int = 2) -> torch.Tensor:
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
        # about 4 small (2-warp) programs per SM: the dequantizing tiles are compute-bound, so more programs than
        # the plain kernel's (one CUDA graph of 20 calls on an H200, 8 KV heads x 32K rows, d 128, 2 / 4 bits:
        # 66 / 81 us at 34 splits of 4 warps, 47 / 51 us at 66 splits of 2 warps)
        avg_rows = max(1, int(flat["rows"]) // max(n_kv, 1))
        num_splits = max(1, min(triton.cdiv(avg_rows, 2 * block_n),
                                triton.cdiv(2 * num_programs_hint(q.device), n_kv)))
    d_pad = d
    work = torch.empty(n_q, num_splits, d_pad + 2, device=q.device, dtype=torch.float32)
    _kivi_split_kernel[(n_kv, num_splits)](
        q, *tensors, meta, work, q.stride(0), g, resolve_scaling(scaling, d) * LOG2E,
        BITS=flat["bits"], QG=flat["group_size"], NUM_SPLITS=num_splits, G_PAD=max(16, next_pow2(g)), D=d,
        BLOCK_N=block_n, DOT_PRECISION=_dot_precision(dtype), KEY_PC=flat["key_per_channel"], num_warps=num_warps)
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
