"""One decode step of attention over one layer of a MiniCache pair, in its device layout (batch 1, GQA).

A layer's rows come from P *parts* (methods/minicache.py); each part stores its keys and, independently, its
values either merged (a unit direction shared by the pair times this layer's magnitude) or plain (the row itself):
- `kdir (Sk, d)`, `kmag (Sk,)`: merged key directions and this layer's key magnitudes (model dtype);
  `krow (Skr, d)`: this layer's plain key rows. `vdir (Sv, d)`, `vmag (Sv,)`, `vrow (Svr, d)`: the same for values.
- `kst`, `vst`, `lens` (P, H) int64: part p of KV head h holds rows r = 0 .. lens[p, h] - 1, its key at index
  kst[p, h] + r and its value at vst[p, h] + r (of the merged or the plain buffer, as the part's kind says).
- `kind`: a tuple of P host ints; bit 0: the part's keys are merged (key = kmag * kdir), else plain (krow);
  bit 1: its values are merged (value = vmag * vdir), else plain (vrow). In practice P = 5, kind = (3, 1, 2, 0, 0)
  (both merged; keys merged only; values merged only; both plain; the layer's own plain rows).
A merged row is restored as the host restores it, `(mag.float() * dir.float()).to(model dtype)`, then attended.

Scores of a query head j of KV head h = j // g: s = scaling * q[j] . key over every row of every part of head h,
one softmax over all of them, output = sum p * value; a head with no row outputs 0.

Triton: one split launch for all parts, grid (H, S): split slot s is split i of the n_p splits of part p (the
caller's split counts per part, `part_splits`, or one count for all). Its program runs ragged_decode's
flash-decoding split over its chunk of part p's rows of head h, restoring merged rows tile by tile (the part's
kind packed into constexpr bit masks: the bulk, keys and values merged, in a loop of its own without branches;
the other kinds branched on at run time), and writes its (max, sum, acc) to slot s of ragged_decode's work
buffer; ragged_decode's reduce kernel then merges all S slots of each query head by their log-sum-exp, one
softmax over every part. No host sync: the split counts come from host-known sizes, each program reads its
lengths on the device (CUDA-graph safe).
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
    def _load_rows(dir_ptr, mag_ptr, row_ptr, stride_dir, stride_row, idx, ok, offs_d, d_ok, MERGED):
        # (BLOCK_N, D_PAD) rows at indices idx: mag * dir rounded to the model dtype (merged), else the plain rows
        m = ok[:, None] & d_ok[None, :]
        if MERGED:
            mag = tl.load(mag_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(dir_ptr + idx[:, None] * stride_dir + offs_d[None, :], mask=m, other=0.0)
            x = (mag[:, None] * x.to(tl.float32)).to(dir_ptr.dtype.element_ty)
        else:
            x = tl.load(row_ptr + idx[:, None] * stride_row + offs_d[None, :], mask=m, other=0.0)
        return x

    @triton.jit
    def _part_rows(q, kdir_ptr, kmag_ptr, krow_ptr, vdir_ptr, vmag_ptr, vrow_ptr, stride_kd, stride_kr, stride_vd,
                   stride_vr, ks, vs, lo, hi, scale_log2, m_i, l_i, acc, offs_n, offs_d, d_ok,
                   K_M, V_M, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # the flash-decoding loop over rows lo .. hi of one part; K_M / V_M: its keys / values merged (constants
        # specialize the loop, run-time flags branch in it)
        for n0 in range(lo, hi, BLOCK_N):
            rows = n0 + offs_n
            ok = rows < hi
            k = _load_rows(kdir_ptr, kmag_ptr, krow_ptr, stride_kd, stride_kr, ks + rows, ok, offs_d, d_ok, K_M)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp2(m_i - m_safe)
            pr = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            v = _load_rows(vdir_ptr, vmag_ptr, vrow_ptr, stride_vd, stride_vr, vs + rows, ok, offs_d, d_ok, V_M)
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _minicache_split_kernel(q_ptr, kdir_ptr, kmag_ptr, krow_ptr, vdir_ptr, vmag_ptr, vrow_ptr, kst_ptr,
                                vst_ptr, lens_ptr, slots_ptr, work_ptr, stride_qh, stride_kd, stride_kr, stride_vd,
                                stride_vr, H, G, D, scale_log2, TOTAL_SPLITS, K_MERGED: tl.constexpr,
                                V_MERGED: tl.constexpr, G_PAD: tl.constexpr,
                                D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # grid: (H, TOTAL_SPLITS); slot s is split slots[s, 1] of slots[s, 2] of part slots[s, 0]; writes work[j, s]
        # for the g query heads j of KV head h
        h = tl.program_id(0)
        slot = tl.program_id(1)
        p = tl.load(slots_ptr + 3 * slot)
        split = tl.load(slots_ptr + 3 * slot + 1)
        n_splits = tl.load(slots_ptr + 3 * slot + 2)
        k_merged = (K_MERGED >> p) & 1  # bit p of the masks: part p's keys / values are merged
        v_merged = (V_MERGED >> p) & 1
        ks = tl.load(kst_ptr + p * H + h)
        vs = tl.load(vst_ptr + p * H + h)
        length = tl.load(lens_ptr + p * H + h)
        chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        g_ok = offs_g < G
        q = tl.load(q_ptr + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        args = (q, kdir_ptr, kmag_ptr, krow_ptr, vdir_ptr, vmag_ptr, vrow_ptr, stride_kd, stride_kr, stride_vd,
                stride_vr, ks, vs, lo, hi, scale_log2, m_i, l_i, acc, offs_n, offs_d, d_ok)
        if (k_merged == 1) & (v_merged == 1):  # the bulk (both merged): a loop without branches, loads pipelined
            m_i, l_i, acc = _part_rows(*args, True, True, BLOCK_N, DOT_PRECISION)
        else:  # the small parts: the sources chosen at run time
            m_i, l_i, acc = _part_rows(*args, k_merged == 1, v_merged == 1, BLOCK_N, DOT_PRECISION)
        # ragged_decode's work layout: (max, sum, acc[0:D_PAD]) per (query head, split); empty: -inf, 0, 0
        base = ((h * G + offs_g) * TOTAL_SPLITS + slot) * (D_PAD + 2)
        tl.store(work_ptr + base, m_i, mask=g_ok)
        tl.store(work_ptr + base + 1, l_i, mask=g_ok)
        tl.store(work_ptr + base[:, None] + 2 + offs_d[None, :], acc, mask=g_ok[:, None])


def _check(q, kdir, kmag, krow, vdir, vmag, vrow, kst, vst, lens, kind) -> int:
    """Shape/dtype checks only (no device sync); returns g."""
    if q.dim() != 2:
        raise ValueError(f"q must be (n_q, d), got shape {tuple(q.shape)}")
    d = q.shape[1]
    dtype = kdir.dtype
    for name, t in (("kdir", kdir), ("krow", krow), ("vdir", vdir), ("vrow", vrow)):
        if t.dim() != 2 or t.shape[1] != d or t.dtype != dtype:
            raise ValueError(f"{name} must be (rows, d={d}) of dtype {dtype} (kdir's), got shape {tuple(t.shape)} "
                             f"dtype {t.dtype}")
    for name, mag, dirs in (("kmag", kmag, kdir), ("vmag", vmag, vdir)):
        if mag.shape != dirs.shape[:1] or not mag.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 1-D float tensor of {dirs.shape[0]} rows (one per direction), got "
                             f"shape {tuple(mag.shape)} dtype {mag.dtype}")
    if lens.dim() != 2 or lens.shape[0] < 1:
        raise ValueError(f"lens must be (P, H) with P >= 1 parts, got shape {tuple(lens.shape)}")
    for name, t in (("kst", kst), ("vst", vst), ("lens", lens)):
        if t.dtype != torch.int64 or t.shape != lens.shape:
            raise ValueError(f"{name} must be an int64 tensor of shape {tuple(lens.shape)} (P, H), got shape "
                             f"{tuple(t.shape)} dtype {t.dtype}")
    if len(kind) != lens.shape[0] or any(not isinstance(k, int) or not 0 <= k <= 3 for k in kind):
        raise ValueError(f"kind must be {lens.shape[0]} ints in 0..3 (one per part: bit 0 keys merged, bit 1 "
                         f"values merged), got {kind!r}")
    return group_size(q.shape[0], lens.shape[1])


def _rows(dirs, mag, plain, merged: bool, a: int, n: int) -> torch.Tensor:
    if merged:
        return (mag[a:a + n].float().unsqueeze(1) * dirs[a:a + n].float()).to(dirs.dtype)
    return plain[a:a + n]


def minicache_decode_attention_ref(q: torch.Tensor, kdir: torch.Tensor, kmag: torch.Tensor, krow: torch.Tensor,
                                   vdir: torch.Tensor, vmag: torch.Tensor, vrow: torch.Tensor, kst: torch.Tensor,
                                   vst: torch.Tensor, lens: torch.Tensor, kind, scaling: float | None = None
                                   ) -> torch.Tensor:
    """Torch reference (float32): per KV head, one softmax of its g query heads over the rows of every part,
    merged rows restored as (mag * dir) rounded to the model dtype. Returns (n_q, d) in q's dtype; a head with
    no row outputs 0. Reads the layout on the host (checks that every part's rows lie inside its buffers)."""
    g = _check(q, kdir, kmag, krow, vdir, vmag, vrow, kst, vst, lens, kind)
    scaling = resolve_scaling(scaling, q.shape[1])
    n_parts, n_kv = lens.shape
    ks, vs, ns = kst.tolist(), vst.tolist(), lens.tolist()
    out = torch.zeros_like(q)
    for h in range(n_kv):
        keys, vals = [], []
        for p in range(n_parts):
            kb, vb = kdir if kind[p] & 1 else krow, vdir if kind[p] & 2 else vrow
            a, b, n = ks[p][h], vs[p][h], ns[p][h]
            if n < 0 or a < 0 or b < 0 or a + n > kb.shape[0] or b + n > vb.shape[0]:
                raise ValueError(f"part {p}, head {h}: {n} rows at keys {a}, values {b} outside the buffers "
                                 f"({kb.shape[0]} key rows, {vb.shape[0]} value rows)")
            keys.append(_rows(kdir, kmag, krow, bool(kind[p] & 1), a, n).float())
            vals.append(_rows(vdir, vmag, vrow, bool(kind[p] & 2), b, n).float())
        k_all, v_all = torch.cat(keys), torch.cat(vals)
        if k_all.shape[0] == 0:
            continue
        s = q[h * g:(h + 1) * g].float() @ k_all.T * scaling
        out[h * g:(h + 1) * g] = (torch.softmax(s, dim=-1) @ v_all).to(q.dtype)
    return out


def minicache_decode_attention_triton(q: torch.Tensor, kdir: torch.Tensor, kmag: torch.Tensor, krow: torch.Tensor,
                                      vdir: torch.Tensor, vmag: torch.Tensor, vrow: torch.Tensor, kst: torch.Tensor,
                                      vst: torch.Tensor, lens: torch.Tensor, kind, scaling: float | None = None,
                                      num_splits: int | None = None, block_n: int = 64, num_warps: int = 4
                                      ) -> torch.Tensor:
    """Triton version of `minicache_decode_attention_ref` (same arguments and result; q is cast to the rows' dtype
    for tl.dot, as in lowrank_decode). No device sync: the lengths are read by the kernel, region bounds are not
    re-checked (the reference checks them)."""
    g = _check(q, kdir, kmag, krow, vdir, vmag, vrow, kst, vst, lens, kind)
    kmag, vmag, kst, vst, lens = (t.contiguous() for t in (kmag, vmag, kst, vst, lens))
    check_triton_inputs(q, kdir, kmag, krow, vdir, vmag, vrow, kst, vst, lens)
    n_q, d = q.shape
    n_parts, n_kv = lens.shape
    dtype = kdir.dtype
    out_dtype = q.dtype
    q = q.to(dtype)  # tl.dot needs both operands in one dtype
    if q.stride(-1) != 1:
        q = q.contiguous()
    dev = q.device
    if num_splits is None:
        # as ragged_decode, from the rows per head of all parts together (the lengths stay on the device): any
        # one part may hold them all; a part's empty chunks cost a program each and weigh 0 in the merge
        avg_rows = (kdir.shape[0] + krow.shape[0]) // n_kv
        num_splits = max(1, min(triton.cdiv(avg_rows, 2 * block_n), triton.cdiv(num_programs_hint(dev) // 2, n_kv)))
    splits = (num_splits,) * n_parts if isinstance(num_splits, int) else tuple(num_splits)
    if len(splits) != n_parts or min(splits) < 1:
        raise ValueError(f"num_splits={num_splits!r}; allowed: an int >= 1, or one per part ({n_parts})")
    slots = _slots(splits, dev)
    total = slots.shape[0]
    d_pad = max(16, next_pow2(d))
    work = torch.empty(n_q, total, d_pad + 2, device=dev, dtype=torch.float32)
    k_merged = sum(1 << p for p, k in enumerate(kind) if k & 1)
    v_merged = sum(1 << p for p, k in enumerate(kind) if k & 2)
    _minicache_split_kernel[(n_kv, total)](
        q, kdir, kmag, krow, vdir, vmag, vrow, kst, vst, lens, slots, work, q.stride(0), kdir.stride(0),
        krow.stride(0), vdir.stride(0), vrow.stride(0), n_kv, g, d, resolve_scaling(scaling, d) * LOG2E, total,
        K_MERGED=k_merged, V_MERGED=v_merged, G_PAD=max(16, next_pow2(g)), D_PAD=d_pad,
        BLOCK_N=block_n, DOT_PRECISION=_dot_precision(dtype), num_warps=num_warps)
    out = torch.empty(n_q, d, device=dev, dtype=out_dtype)
    lse = torch.empty(n_q, device=dev, dtype=torch.float32)
    _decode_reduce_kernel[(n_q,)](work, out, lse, out.stride(0), d, NUM_SPLITS=total, S_PAD=next_pow2(total),
                                  D_PAD=d_pad, num_warps=num_warps)
    return out


_SLOTS: dict = {}


def _slots(splits: tuple[int, ...], dev: torch.device) -> torch.Tensor:
    """(total, 3) int32 on the device: each split slot's part, its split, the part's split count. Made once per
    split counts and device (outside a CUDA graph's capture: the first call is a warm-up step)."""
    key = (splits, str(dev))
    if key not in _SLOTS:
        rows = [(p, i, n) for p, n in enumerate(splits) for i in range(n)]
        _SLOTS[key] = torch.tensor(rows, dtype=torch.int32, device=dev)
    return _SLOTS[key]


def part_splits(rows: list[int], n_kv: int, dev: torch.device, block_n: int = 64) -> tuple[int, ...]:
    """Splits per part from each part's rows per head (at most; host-known, e.g. its capacity): about one program
    per SM for the largest (measured best on an H200 at 32K: reports/examples/storage_graph_h200.md), fewer for
    small parts, whose programs would otherwise mostly find nothing to read."""
    most = max(1, triton.cdiv(num_programs_hint(dev), n_kv)) if HAS_TRITON else 1
    return tuple(max(1, min(most, -(-n // (2 * block_n)))) for n in rows)


def minicache_decode_attention(q: torch.Tensor, kdir: torch.Tensor, kmag: torch.Tensor, krow: torch.Tensor,
                               vdir: torch.Tensor, vmag: torch.Tensor, vrow: torch.Tensor, kst: torch.Tensor,
                               vst: torch.Tensor, lens: torch.Tensor, kind, scaling: float | None = None
                               ) -> torch.Tensor:
    """Triton on CUDA, the torch reference elsewhere."""
    args = (q, kdir, kmag, krow, vdir, vmag, vrow, kst, vst, lens)
    if use_triton(*args):
        return minicache_decode_attention_triton(*args, kind, scaling)
    return minicache_decode_attention_ref(*args, kind, scaling)
