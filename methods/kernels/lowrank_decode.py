"""One decode step of attention over keys and values stored at a reduced dimension (ThinK, Eigen Attention).

A layer is one or more *parts*, each a ragged per-head store (batch 1, GQA, heads back to back as in
ragged_decode): `keys (T, DK)`, `values (T, DV)`, `starts`/`lengths` (n_kv,) int64, and optionally
`channels (n_kv, DK)` — the query channels each KV head's keys hold (ThinK's kept key channels; the query of a
head is read at those channels only, so a key that stores DK of the d channels is scored against the DK
matching channels of the query). Every part of a layer shares the value dimension DV; each part has its own DK.
- ThinK: part 1 = the pruned rows (DK = kept channels, `channels` given), part 2 = the full rows (the recent
  window and every appended token, DK = d), DV = d.
- Eigen Attention: one part, keys K P_k and values V P_v at rank r (DK = DV = r); the caller projects the query
  (q P_k) and lifts the output (out P_v^T).

Scores of a query head of KV head h: s = scaling * q[channels[h]] . k over every row of every part, one softmax
over all of them, output = sum p * v (DV wide).

Triton: ragged_decode's split-K flash-decoding split kernel with separate DK/DV tiles (and a gathered query
load when `channels` is given), launched once per part into disjoint split slots of one work buffer; the
reduce kernel of ragged_decode then merges every split of every part by its log-sum-exp, so the parts are
combined exactly as one softmax over all rows.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_triton_inputs, group_size, next_pow2, num_programs_hint, resolve_scaling, use_triton
from .colsum import LOG2E, _dot_precision

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .ragged_decode import _decode_reduce_kernel

    @triton.jit
    def _lowrank_split_kernel(q_ptr, ch_ptr, k_ptr, v_ptr, starts_ptr, lengths_ptr, work_ptr,
                              stride_qh, stride_kt, stride_vt, G, DK, DV, scale_log2, split_base,
                              TOTAL_SPLITS, NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr,
                              DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, HAS_CH: tl.constexpr):
        # grid: (n_kv, NUM_SPLITS); writes work[j, split_base + split] for the g query heads j of KV head h
        h = tl.program_id(0)
        split = tl.program_id(1)
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)
        offs_g = tl.arange(0, G_PAD)
        offs_k = tl.arange(0, DK_PAD)
        offs_v = tl.arange(0, DV_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        k_ok = offs_k < DK
        v_ok = offs_v < DV
        g_ok = offs_g < G
        if HAS_CH:  # the query channels this head's keys hold (ThinK's kept channels)
            cols = tl.load(ch_ptr + h * DK + offs_k, mask=k_ok, other=0).to(tl.int64)
        else:
            cols = offs_k
        q = tl.load(q_ptr + (h * G + offs_g)[:, None] * stride_qh + cols[None, :],
                    mask=g_ok[:, None] & k_ok[None, :], other=0.0)
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, DV_PAD), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            rows = n0 + offs_n
            ok = rows < hi
            k = tl.load(k_ptr + (start + rows)[:, None] * stride_kt + offs_k[None, :],
                        mask=ok[:, None] & k_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (start + rows)[:, None] * stride_vt + offs_v[None, :],
                        mask=ok[:, None] & v_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        # ragged_decode's work layout: (max, sum, acc[0:DV_PAD]) per (query head, split); empty: -inf, 0, 0
        base = ((h * G + offs_g) * TOTAL_SPLITS + split_base + split) * (DV_PAD + 2)
        tl.store(work_ptr + base, m_i, mask=g_ok)
        tl.store(work_ptr + base + 1, l_i, mask=g_ok)
        tl.store(work_ptr + base[:, None] + 2 + offs_v[None, :], acc, mask=g_ok[:, None])


def _check_parts(q: torch.Tensor, parts) -> tuple[int, int]:
    """(g, DV). parts: [(keys (T, DK), values (T, DV), starts, lengths, channels (n_kv, DK) or None)]."""
    if q.dim() != 2:
        raise ValueError(f"q must be (n_q, d), got shape {tuple(q.shape)}")
    if not parts:
        raise ValueError("lowrank decode needs at least one part (keys, values, starts, lengths, channels)")
    dv = parts[0][1].shape[1]
    n_kv = parts[0][2].numel()
    for i, (k, v, s, n, ch) in enumerate(parts):
        if k.dim() != 2 or v.dim() != 2 or k.shape[0] != v.shape[0] or v.shape[1] != dv or k.dtype != v.dtype:
            raise ValueError(f"part {i}: keys {tuple(k.shape)} {k.dtype} / values {tuple(v.shape)} {v.dtype} must "
                             f"be (T, DK) / (T, DV={dv}) of one dtype")
        for name, t in (("starts", s), ("lengths", n)):
            if t.dim() != 1 or t.dtype != torch.int64 or t.numel() != n_kv:
                raise ValueError(f"part {i}: {name} must be a 1-D int64 tensor of {n_kv} heads")
        if ch is None:
            if k.shape[1] != q.shape[1]:
                raise ValueError(f"part {i}: keys of dim {k.shape[1]} without channels need q of that dim, "
                                 f"got q {tuple(q.shape)}")
        elif ch.shape != (n_kv, k.shape[1]):
            raise ValueError(f"part {i}: channels {tuple(ch.shape)} must be (n_kv={n_kv}, DK={k.shape[1]})")
    return group_size(q.shape[0], n_kv), dv


def lowrank_decode_attention_ref(q: torch.Tensor, parts, scaling: float | None = None) -> torch.Tensor:
    """Torch reference (float32): per KV head, one softmax of its g query heads over the rows of every part,
    each part's keys scored against the query's channels `channels[h]` (all d channels without).
    Returns (n_q, DV) in q's dtype; a head with no row outputs 0."""
    g, dv = _check_parts(q, parts)
    scaling = resolve_scaling(scaling, q.shape[1])
    n_kv = parts[0][2].numel()
    out = torch.zeros(q.shape[0], dv, dtype=q.dtype, device=q.device)
    for h in range(n_kv):
        qh = q[h * g:(h + 1) * g].float()
        scores, vals = [], []
        for k, v, s, n, ch in parts:
            a, L = int(s[h]), int(n[h])
            qc = qh if ch is None else qh[:, ch[h].long()]
            scores.append(qc @ k[a:a + L].float().T * scaling)
            vals.append(v[a:a + L].float())
        s_all = torch.cat(scores, dim=1)
        if s_all.shape[1] == 0:
            continue
        out[h * g:(h + 1) * g] = (torch.softmax(s_all, dim=-1) @ torch.cat(vals)).to(q.dtype)
    return out


def lowrank_decode_attention_triton(q: torch.Tensor, parts, scaling: float | None = None,
                                    num_splits: int | None = None, block_n: int | None = None,
                                    num_warps: int = 4) -> torch.Tensor:
    """Triton version of `lowrank_decode_attention_ref` (same arguments and result). No device sync."""
    g, dv = _check_parts(q, parts)
    for k, v, s, n, ch in parts:
        check_triton_inputs(q, k, v, s, n, *([] if ch is None else [ch]))
    n_q, d = q.shape
    n_kv = parts[0][2].numel()
    kdtype = parts[0][0].dtype
    out_dtype = q.dtype
    qk = q.to(kdtype)  # tl.dot needs both operands in one dtype
    if qk.stride(-1) != 1:
        qk = qk.contiguous()
    dev = q.device
    if block_n is None:  # narrow rows (Eigen Attention's rank 48): tiles of 128 rows read more per program
        block_n = 128 if max(max(p[0].shape[1] for p in parts), dv) <= 64 else 64
    # splits per part, about two programs per SM over its rows (ThinK's full part is small: few splits). H200, 32K
    # tokens, 8 KV heads, one split launch: rank 48 took 29.1 us at 17 splits of 64-row tiles, 17.8 at 33 of 128
    # (reports/examples/storage_graph_h200.md)
    splits = []
    for k, *_ in parts:
        avg_rows = k.shape[0] // max(n_kv, 1)
        splits.append(num_splits or max(1, min(triton.cdiv(avg_rows, 2 * block_n),
                                               triton.cdiv(num_programs_hint(dev), n_kv))))
    total = sum(splits)
    dv_pad = max(16, next_pow2(dv))
    work = torch.empty(n_q, total, dv_pad + 2, device=dev, dtype=torch.float32)
    scale_log2 = resolve_scaling(scaling, d) * LOG2E
    base = 0
    for (k, v, s, n, ch), ns in zip(parts, splits):
        dk = k.shape[1]
        _lowrank_split_kernel[(n_kv, ns)](
            qk, s if ch is None else ch, k, v, s, n, work, qk.stride(0), k.stride(0), v.stride(0), g, dk, dv,
            scale_log2, base, total, NUM_SPLITS=ns, G_PAD=max(16, next_pow2(g)),
            DK_PAD=max(16, next_pow2(dk)), DV_PAD=dv_pad, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(kdtype),
            HAS_CH=ch is not None, num_warps=num_warps)
        base += ns
    out = torch.empty(n_q, dv, device=dev, dtype=out_dtype)
    lse = torch.empty(n_q, device=dev, dtype=torch.float32)
    _decode_reduce_kernel[(n_q,)](work, out, lse, out.stride(0), dv, NUM_SPLITS=total,
                                  S_PAD=next_pow2(total), D_PAD=dv_pad, num_warps=num_warps)
    return out


if HAS_TRITON:
    @triton.jit
    def _project_append_kernel(kn_ptr, vn_ptr, pos_ptr, pk_ptr, pv_ptr, k_ptr, v_ptr, p_ptr, starts_ptr,
                               lengths_ptr, D, R, D_PAD: tl.constexpr, R_PAD: tl.constexpr):
        # grid: (n_kv,). Head h's token projected to rank R (key: k P_k; value: v P_v[h], float32) and stored at
        # the head's end in the cache's dtype; its position; its length + 1
        h = tl.program_id(0)
        offs_d = tl.arange(0, D_PAD)
        offs_r = tl.arange(0, R_PAD)
        d_ok = offs_d < D
        r_ok = offs_r < R
        m = d_ok[:, None] & r_ok[None, :]
        k = tl.load(kn_ptr + h * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.load(vn_ptr + h * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        pk = tl.load(pk_ptr + offs_d[:, None] * R + offs_r[None, :], mask=m, other=0.0)
        pv = tl.load(pv_ptr + h * D * R + offs_d[:, None] * R + offs_r[None, :], mask=m, other=0.0)
        n = tl.load(lengths_ptr + h)
        row = tl.load(starts_ptr + h) + n
        tl.store(k_ptr + row * R + offs_r, tl.sum(k[:, None] * pk, 0).to(k_ptr.dtype.element_ty), mask=r_ok)
        tl.store(v_ptr + row * R + offs_r, tl.sum(v[:, None] * pv, 0).to(v_ptr.dtype.element_ty), mask=r_ok)
        tl.store(p_ptr + row, tl.load(pos_ptr))
        tl.store(lengths_ptr + h, n + 1)


    @triton.jit
    def _matvec_kernel(x_ptr, w_ptr, y_ptr, IN, OUT, stride_x, stride_y, W_GROUP, stride_wg, s_in, s_out,
                       IN_PAD: tl.constexpr, OUT_PAD: tl.constexpr):
        # grid: (rows,). y[j] = x[j] @ W[j // W_GROUP], W's entry (i, o) at i * s_in + o * s_out; float32 sums
        j = tl.program_id(0)
        offs_i = tl.arange(0, IN_PAD)
        offs_o = tl.arange(0, OUT_PAD)
        i_ok = offs_i < IN
        o_ok = offs_o < OUT
        x = tl.load(x_ptr + j * stride_x + offs_i, mask=i_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (j // W_GROUP) * stride_wg + offs_i[:, None] * s_in + offs_o[None, :] * s_out,
                    mask=i_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
        tl.store(y_ptr + j * stride_y + offs_o, tl.sum(x[:, None] * w, 0).to(y_ptr.dtype.element_ty), mask=o_ok)


def matvec_ref(x: torch.Tensor, w: torch.Tensor, transpose: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Row j of x (n, IN) times matrix j // (n / len(w)) of w (m, IN, OUT), or of its transpose (w (m, OUT, IN),
    transpose=True), in float32, rounded to out_dtype: Eigen Attention's query projection q P_k (one matrix) and
    its lift out P_v^T (one per KV head)."""
    m = w.shape[0]
    wf = w.float().transpose(1, 2) if transpose else w.float()
    return (x.float().reshape(m, -1, x.shape[1]) @ wf).reshape(x.shape[0], -1).to(out_dtype)


def matvec_triton(x: torch.Tensor, w: torch.Tensor, transpose: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton version of `matvec_ref` (one launch; sums in another order: equal to float32 rounding)."""
    n, IN = x.shape
    m = w.shape[0]
    w = w.contiguous()
    check_triton_inputs(x, w)
    OUT = w.shape[1] if transpose else w.shape[2]
    s_in, s_out = (1, IN) if transpose else (OUT, 1)
    y = torch.empty(n, OUT, dtype=out_dtype, device=x.device)
    _matvec_kernel[(n,)](x, w, y, IN, OUT, x.stride(0), y.stride(0), n // m, w.stride(0), s_in, s_out,
                         IN_PAD=max(16, next_pow2(IN)), OUT_PAD=max(16, next_pow2(OUT)), num_warps=4)
    return y


def project_append_ref(k_new, v_new, pos, pk: torch.Tensor, pv: torch.Tensor, rows) -> None:
    """Eigen Attention's append of one token (k_new, v_new (n_kv, d); pos (1,)) to its rank-r rows (a LayerKV with
    spare rows): the key times P_k (d, r), the value times its head's P_v (n_kv, d, r), in float32, stored in the
    rows' dtype (methods/eigen_attention.py `EigenLayer.append`)."""
    from .append import ragged_append_ref
    dt = rows.keys.dtype
    kp, vp = matvec_ref(k_new, pk.unsqueeze(0), False, dt), matvec_ref(v_new, pv, False, dt)
    ragged_append_ref(kp, vp, pos, rows.keys, rows.values, rows.positions, rows.starts, rows.lengths)


def project_append_triton(k_new, v_new, pos, pk: torch.Tensor, pv: torch.Tensor, rows) -> None:
    """Triton version of `project_append_ref`: one launch (the products summed in another order: float32
    rounding apart, then the same rounding to the rows' dtype)."""
    n_kv, d = k_new.shape
    r = pk.shape[1]
    k_new, v_new, pk, pv = k_new.contiguous(), v_new.contiguous(), pk.float().contiguous(), pv.float().contiguous()
    check_triton_inputs(k_new, v_new, pos, pk, pv, rows.keys, rows.values, rows.positions, rows.starts, rows.lengths)
    if rows.keys.stride(0) != r or rows.values.stride(0) != r:
        raise ValueError("project_append_triton needs contiguous rank-r rows")
    _project_append_kernel[(n_kv,)](k_new, v_new, pos, pk, pv, rows.keys, rows.values, rows.positions, rows.starts,
                                    rows.lengths, d, r, D_PAD=max(16, next_pow2(d)), R_PAD=max(16, next_pow2(r)),
                                    num_warps=4)


def lowrank_decode_attention(q: torch.Tensor, parts, scaling: float | None = None) -> torch.Tensor:
    """Triton on CUDA, the torch reference elsewhere."""
    tensors = [q] + [t for p in parts for t in p if t is not None]
    if use_triton(*tensors):
        return lowrank_decode_attention_triton(q, parts, scaling)
    return lowrank_decode_attention_ref(q, parts, scaling)
