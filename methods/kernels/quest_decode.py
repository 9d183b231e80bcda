"""One decode step of attention that reads only the pages Quest selected (methods/quest.py), per query head.

Layout: the plain ragged cache of kvbench.cache (`keys`/`values` (T, d), KV head h owns rows
`starts[h] : starts[h] + lengths[h]`), cut into pages of `page_size` consecutive rows of each head in row order
(page p of head h: local rows p * page_size ... p * page_size + page_size - 1, the last page may be partial).
`pages` (n_q, K) int32: the local page indices query head j attends to (its KV head is j // g); -1 = no page.

The split kernel is ragged_decode's split-K flash-decoding re-cut for page lists: one program per
(query head, split) walks a contiguous share of that head's page list, PAGES_PER_TILE pages (a tile of rows) at
a time, loading only those rows' keys and values, with an online softmax; ragged_decode's reduce kernel merges
the splits. Each query head reads its own pages (the heads of a GQA group choose different pages), so a row two
heads of a group both select is read twice: what `QuestLayer.read_bytes` counts.
Options as ragged_decode: `softcap`, `window` (by original position), `log_weight` (merged rows).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_layout, check_triton_inputs, group_size, next_pow2, num_programs_hint, \
    resolve_scaling, use_triton
from .colsum import LOG2E, _dot_precision

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .ragged_decode import _decode_reduce_kernel

    @triton.jit
    def _quest_split_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, lengths_ptr, pages_ptr, work_ptr, pos_ptr, qpos_ptr,
                            lw_ptr, stride_qh, stride_kt, stride_vt, stride_ph, G, D, K, scale_log2, softcap_log2,
                            window, PAGE: tl.constexpr, PAGES_PER_TILE: tl.constexpr, TILE: tl.constexpr,
                            NUM_SPLITS: tl.constexpr, D_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                            HAS_WINDOW: tl.constexpr, HAS_LOGW: tl.constexpr):
        # grid: (n_q, NUM_SPLITS)
        j = tl.program_id(0)
        split = tl.program_id(1)
        h = j // G
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        # this split's share of the K page slots, a multiple of PAGES_PER_TILE
        chunk = tl.cdiv(tl.cdiv(K, NUM_SPLITS), PAGES_PER_TILE) * PAGES_PER_TILE
        lo = split * chunk
        hi = tl.minimum(lo + chunk, K)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        offs_t = tl.arange(0, TILE)                 # row r of the tile: page slot r // PAGE, row r % PAGE in it
        t_ok = offs_t < PAGES_PER_TILE * PAGE
        slot_in_tile = offs_t // PAGE
        in_page = offs_t % PAGE
        q = tl.load(q_ptr + j * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        m_i = tl.full((1,), float("-inf"), tl.float32)
        l_i = tl.zeros((1,), tl.float32)
        acc = tl.zeros((1, D_PAD), tl.float32)
        if HAS_WINDOW:
            q_pos = tl.load(qpos_ptr)
        for s0 in range(lo, hi, PAGES_PER_TILE):
            slot = s0 + slot_in_tile
            page = tl.load(pages_ptr + j * stride_ph + slot, mask=t_ok & (slot < hi), other=-1)
            local = page.to(tl.int64) * PAGE + in_page
            ok = t_ok & (page >= 0) & (local < length)
            rows = start + local
            k = tl.load(k_ptr + rows[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                        other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale_log2   # (TILE,) base-2 logits
            if HAS_SOFTCAP:  # softcap * tanh(x / softcap), in base 2 (see ragged_decode)
                s = softcap_log2 * (2.0 * tl.sigmoid(2.0 * s / softcap_log2) - 1.0)
            if HAS_LOGW:
                s = s + tl.load(lw_ptr + rows, mask=ok, other=0.0) * 1.4426950408889634
            if HAS_WINDOW:
                kpos = tl.load(pos_ptr + rows, mask=ok, other=0)
                ok = ok & (kpos > q_pos - window)
            s2 = tl.where(ok, s, float("-inf"))[None, :]                # (1, TILE)
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s2 - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + rows[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc = acc * alpha[:, None] + tl.sum(tl.trans(p) * v.to(tl.float32), 0)[None, :]
            m_i = m_new
        # work[j, split] = (max, sum, acc[0:D_PAD]), the layout ragged_decode's reduce kernel merges
        base = (j * NUM_SPLITS + split) * (D_PAD + 2)
        tl.store(work_ptr + base, tl.max(m_i, 0))
        tl.store(work_ptr + base + 1, tl.sum(l_i, 0))
        tl.store(work_ptr + base + 2 + offs_d, tl.sum(acc, 0))

    @triton.jit
    def _quest_score_kernel(q_ptr, lo_ptr, hi_ptr, nsc_ptr, out_ptr, stride_qh, stride_bh, stride_bp, stride_oh,
                            G, D, P, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, FROM_LENGTHS: tl.constexpr = 0):
        # grid: (n_kv, cdiv(P, BLOCK_P)): the g query heads of KV head h against BLOCK_P pages' bounds
        h = tl.program_id(0)
        pb = tl.program_id(1)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        g_ok = offs_g < G
        d_ok = offs_d < D
        p_ok = p < P
        q = tl.load(q_ptr + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        qf = q.to(tl.float32)            # q+ pairs with the maxima, q- with the minima
        qp = tl.maximum(qf, 0.0).to(q.dtype)
        qn = tl.minimum(qf, 0.0).to(q.dtype)
        bmask = p_ok[:, None] & d_ok[None, :]
        boff = h * stride_bh + p[:, None] * stride_bp + offs_d[None, :]
        hi = tl.load(hi_ptr + boff, mask=bmask, other=0.0)
        lo = tl.load(lo_ptr + boff, mask=bmask, other=0.0)
        s = tl.dot(qp, tl.trans(hi), input_precision=DOT_PRECISION)
        s += tl.dot(qn, tl.trans(lo), input_precision=DOT_PRECISION)
        n_sc = tl.load(nsc_ptr + h)
        if FROM_LENGTHS > 0:  # nsc_ptr holds the head's rows: every page but its last is scored
            n_sc = (n_sc - 1) // FROM_LENGTHS
        s = tl.where((p < n_sc)[None, :], s, float("-inf"))
        tl.store(out_ptr + (h * G + offs_g)[:, None] * stride_oh + p[None, :], s, mask=g_ok[:, None] & p_ok[None, :])


def quest_page_scores_ref(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                          n_scored: torch.Tensor) -> torch.Tensor:
    """Quest's page score of each query head (paper, Alg. 1): sum_c max(q_c m_c, q_c M_c), computed as
    q+ . M + q- . m (q+ = max(q, 0), q- = min(q, 0): the same sum) in float32.
    q (n_q, d); kmin, kmax (n_kv, P, d) per-page channel minima / maxima; n_scored (n_kv,) int64: head h scores
    its pages 0 .. n_scored[h] - 1, the others get -inf. Returns (n_q, P) float32."""
    n_kv, P, d = kmin.shape
    qf = q.float().view(n_kv, -1, d)
    s = qf.clamp(min=0) @ kmax.float().transpose(1, 2) + qf.clamp(max=0) @ kmin.float().transpose(1, 2)
    ok = torch.arange(P, device=q.device) < n_scored.view(-1, 1, 1)
    return s.masked_fill(~ok, float("-inf")).reshape(-1, P)


def quest_page_scores_triton(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_scored: torch.Tensor,
                             block_p: int = 64, num_warps: int = 4, page_size: int = 0) -> torch.Tensor:
    """Triton version of `quest_page_scores_ref`: reads each page's bounds once for the g heads of its group,
    in their stored dtype, products accumulated in float32 (tl.dot). page_size > 0: `n_scored` is each head's
    row count, and the pages before its last are scored ((rows - 1) // page_size of them, on the device)."""
    n_kv, P, d = kmin.shape
    n_q = q.shape[0]
    g = group_size(n_q, n_kv)
    check_triton_inputs(q, kmin, kmax, n_scored)
    if kmin.stride() != kmax.stride() or kmin.stride(-1) != 1:
        raise ValueError("kmin and kmax must share a layout with unit column stride")
    q = q.to(kmin.dtype).contiguous()
    out = torch.empty(n_q, P, device=q.device, dtype=torch.float32)
    _quest_score_kernel[(n_kv, triton.cdiv(max(P, 1), block_p))](
        q, kmin, kmax, n_scored, out, q.stride(0), kmin.stride(0), kmin.stride(1), out.stride(0), g, d, P,
        G_PAD=max(16, next_pow2(g)), D_PAD=max(16, next_pow2(d)), BLOCK_P=block_p,
        DOT_PRECISION=_dot_precision(kmin.dtype), FROM_LENGTHS=page_size, num_warps=num_warps)
    return out


if HAS_TRITON:
    @triton.jit
    def _sort_key(sc, idx, IDX_PAD: tl.constexpr):
        """(order-preserving score bits << 32 | IDX_PAD - 1 - idx) as int64: sorting these keys in descending order
        sorts by score, ties to the lower index; every key is distinct."""
        bits = sc.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)   # float order as signed integer order
        return (key.to(tl.int64) << 32) | (IDX_PAD - 1 - idx).to(tl.int64)

    @triton.jit
    def _store_pages(srt, j, out_ptr, stride_oh, lengths_ptr, G, TOP, PAGE: tl.constexpr, IDX_PAD: tl.constexpr):
        """Query head j's row of the selection from its keys sorted in descending order: the first TOP pages (-1
        where the score is -inf), then its head's last page."""
        n: tl.constexpr = srt.shape[0]
        offs = tl.arange(0, n)
        page = IDX_PAD - 1 - (srt & 0xFFFFFFFF).to(tl.int32)
        ninf = tl.full((n,), float("-inf"), tl.float32).to(tl.int32, bitcast=True)
        valid = (srt >> 32).to(tl.int32) != (ninf ^ ((ninf >> 31) & 0x7FFFFFFF))
        tl.store(out_ptr + j * stride_oh + offs, tl.where(valid, page, -1), mask=offs < TOP)
        last = (tl.load(lengths_ptr + j // G) - 1) // PAGE
        tl.store(out_ptr + j * stride_oh + TOP, last.to(tl.int32))

    @triton.jit
    def _quest_select_kernel(s_ptr, lengths_ptr, out_ptr, stride_sh, stride_oh, G, P, TOP,
                             PAGE: tl.constexpr, P_PAD: tl.constexpr):
        # grid: (n_q,). The TOP highest-scoring pages of query head j (scores -inf: -1), then its head's last page:
        # one sort of its keys (`_sort_key`)
        j = tl.program_id(0)
        offs = tl.arange(0, P_PAD)
        sc = tl.load(s_ptr + j * stride_sh + offs, mask=offs < P, other=float("-inf"))
        srt = tl.sort(_sort_key(sc, offs, P_PAD), descending=True)
        _store_pages(srt, j, out_ptr, stride_oh, lengths_ptr, G, TOP, PAGE, P_PAD)

    @triton.jit
    def _quest_chunk_top_kernel(s_ptr, cand_ptr, stride_sh, P, T, CH: tl.constexpr, IDX_PAD: tl.constexpr):
        # grid: (n_q, chunks). The T highest keys (`_sort_key`) of one chunk of CH scored pages, in order: the
        # global top of a query head is the top of its chunks' tops (keys are distinct), which one program merges
        j = tl.program_id(0)
        c = tl.program_id(1)
        idx = c * CH + tl.arange(0, CH)
        sc = tl.load(s_ptr + j * stride_sh + idx, mask=idx < P, other=float("-inf"))
        srt = tl.sort(_sort_key(sc, idx, IDX_PAD), descending=True)
        offs = tl.arange(0, CH)
        tl.store(cand_ptr + (j * tl.num_programs(1) + c) * T + offs, srt, mask=offs < T)

    @triton.jit
    def _quest_merge_top_kernel(cand_ptr, lengths_ptr, out_ptr, stride_oh, G, N_CAND, TOP,
                                PAGE: tl.constexpr, IDX_PAD: tl.constexpr, C_PAD: tl.constexpr):
        # grid: (n_q,). One sort of a query head's chunk tops; then as _quest_select_kernel
        j = tl.program_id(0)
        offs = tl.arange(0, C_PAD)
        key = tl.load(cand_ptr + j * N_CAND + offs, mask=offs < N_CAND, other=-9223372036854775807 - 1)
        _store_pages(tl.sort(key, descending=True), j, out_ptr, stride_oh, lengths_ptr, G, TOP, PAGE, IDX_PAD)

    @triton.jit
    def _quest_append_kernel(kn_ptr, vn_ptr, pos_ptr, k_ptr, v_ptr, p_ptr, starts_ptr, lengths_ptr, lo_ptr, hi_ptr,
                             stride_bh, D, PAGE: tl.constexpr, D_PAD: tl.constexpr):
        # grid: (n_kv,). The token's row at the head's end, and its key into the bounds of the page it lands in
        h = tl.program_id(0)
        offs = tl.arange(0, D_PAD)
        ok = offs < D
        n = tl.load(lengths_ptr + h)
        row = tl.load(starts_ptr + h) + n
        k = tl.load(kn_ptr + h * D + offs, mask=ok)
        tl.store(k_ptr + row * D + offs, k.to(k_ptr.dtype.element_ty), mask=ok)
        tl.store(v_ptr + row * D + offs, tl.load(vn_ptr + h * D + offs, mask=ok).to(v_ptr.dtype.element_ty), mask=ok)
        tl.store(p_ptr + row, tl.load(pos_ptr))
        b = h * stride_bh + (n // PAGE) * D + offs
        kb = k.to(lo_ptr.dtype.element_ty)
        tl.store(lo_ptr + b, tl.minimum(tl.load(lo_ptr + b, mask=ok), kb), mask=ok)
        tl.store(hi_ptr + b, tl.maximum(tl.load(hi_ptr + b, mask=ok), kb), mask=ok)
        tl.store(lengths_ptr + h, n + 1)


def quest_select_ref(scores: torch.Tensor, lengths: torch.Tensor, page_size: int, top: int) -> torch.Tensor:
    """Pages each query head reads at a decode step, at a fixed width (the device step's, methods/quest.py):
    scores (n_q, P) from `quest_page_scores` (-inf: not scored); returns (n_q, top + 1) int32, the `top`
    highest-scoring pages in descending order (-1 where the score is -inf), then the head's last page
    (lengths - 1) // page_size. Ties: the lower page first."""
    # a stable sort, descending: equal scores keep the lower index first
    val, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return _with_last(val[:, :top], idx[:, :top], lengths, page_size)


def _with_last(val: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor, page_size: int) -> torch.Tensor:
    """(n_q, top) chosen pages (-1 where the score is -inf), then each query head's last page."""
    n_q = val.shape[0]
    last = torch.div(lengths - 1, page_size, rounding_mode="floor").repeat_interleave(n_q // lengths.numel())
    return torch.cat([torch.where(val > float("-inf"), idx, -1), last.view(-1, 1)], 1).to(torch.int32)


# `quest_select_triton`'s choice (QuestLayer.device_step). Measured with one CUDA graph of each, H200, 32 query heads,
# top 63: one program per head sorting every page takes 11.4 us at 640 or 1024 pages, 26.6 at 2048, 70 at 2560;
# torch.topk 26.7 / 29.2 / 32.4 / 37.1; the chunked selection 5.0 / 5.0 / 6.8 / 15.2 in chunks of 256 and
# 5.7 / 5.7 / 6.4 / 9.2 in chunks of 512 (9.4 at 4096 pages, 20.2 at 8192, where torch.topk takes 45.2 / 59.0).
SELECT_MAX_PAGES = 256  # up to this many scored pages, one program per query head sorts them all


def select_chunk(pages: int) -> int:
    """The chunked selection's chunk for this many scored pages (the faster of 256 and 512 above)."""
    return 256 if pages <= 1024 else 512


def quest_select_topk(scores: torch.Tensor, lengths: torch.Tensor, page_size: int, top: int) -> torch.Tensor:
    """`quest_select_ref` through torch.topk (the engine loop's `QuestLayer.select`; equal scores may be taken in
    another order: a page set differs only on exact ties)."""
    val, idx = torch.topk(scores, top, dim=-1)
    return _with_last(val, idx, lengths, page_size)


def quest_select_triton(scores: torch.Tensor, lengths: torch.Tensor, page_size: int, top: int,
                        chunk: int | None = None) -> torch.Tensor:
    """Triton version of `quest_select_ref` (same result). Up to SELECT_MAX_PAGES scored pages (chunk None), one
    program per query head sorts them all; past that, or with a `chunk`, two launches: programs (query head,
    chunk of pages) sort their chunk in parallel and keep its min(top, chunk) best, then one program per query
    head sorts those candidates. Exact: the keys are distinct, so a head's top pages are among its chunks' tops."""
    check_triton_inputs(scores, lengths)
    n_q, P = scores.shape
    if not 0 <= top <= P:
        raise ValueError(f"top={top}; allowed: 0 .. {P} (the scored pages)")
    if chunk is not None and (chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"chunk={chunk}; allowed: a power of two >= 16")
    G = n_q // lengths.numel()
    out = torch.empty(n_q, top + 1, dtype=torch.int32, device=scores.device)
    if chunk is None and P <= SELECT_MAX_PAGES:
        P_PAD = max(16, next_pow2(P))
        _quest_select_kernel[(n_q,)](scores, lengths, out, scores.stride(0), out.stride(0), G, P, top,
                                     PAGE=page_size, P_PAD=P_PAD, num_warps=4)
        return out
    chunk = chunk or select_chunk(P)
    n_chunks = triton.cdiv(P, chunk)
    T = max(1, min(top, chunk))
    idx_pad = max(16, next_pow2(P), chunk)
    cand = torch.empty(n_q, n_chunks * T, dtype=torch.int64, device=scores.device)
    _quest_chunk_top_kernel[(n_q, n_chunks)](scores, cand, scores.stride(0), P, T, CH=chunk, IDX_PAD=idx_pad,
                                             num_warps=4)
    c_pad = max(16, next_pow2(n_chunks * T))
    _quest_merge_top_kernel[(n_q,)](cand, lengths, out, out.stride(0), G, n_chunks * T, top,
                                    PAGE=page_size, IDX_PAD=idx_pad, C_PAD=c_pad, num_warps=4 if c_pad <= 2048 else 8)
    return out


def take_into_bounds(kmin: torch.Tensor, kmax: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor,
                     page_size: int) -> None:
    """Keys (n_kv, q, d) at local rows (n_kv, q) into the per-channel minimum / maximum of the pages holding
    them, in place (kmin, kmax (n_kv, pages, d); a new page starts at +inf / -inf, so its first row sets them)."""
    n_kv, cap, d = kmin.shape
    page = (torch.arange(n_kv, device=kmin.device).view(-1, 1) * cap + rows // page_size).view(-1, 1).expand(-1, d)
    src = keys.reshape(-1, d).to(kmin.dtype)
    kmin.view(-1, d).scatter_reduce_(0, page, src, "amin")
    kmax.view(-1, d).scatter_reduce_(0, page, src, "amax")


def quest_append_ref(k_new, v_new, pos, layer, kmin: torch.Tensor, kmax: torch.Tensor, page_size: int) -> None:
    """Append one token (k_new, v_new: (n_kv, d); pos (1,)) to a QuestLayer's plain rows (spare rows reserved)
    and take its key into the bounds of the page it lands in, as `QuestLayer.append` does."""
    from .append import ragged_append_ref
    take_into_bounds(kmin, kmax, layer.lengths.view(-1, 1), k_new, page_size)
    ragged_append_ref(k_new, v_new, pos, layer.keys, layer.values, layer.positions, layer.starts, layer.lengths)


def quest_append_triton(k_new, v_new, pos, layer, kmin: torch.Tensor, kmax: torch.Tensor, page_size: int) -> None:
    """Triton version of `quest_append_ref`: one launch (rows, bounds, lengths)."""
    n_kv, cap, d = kmin.shape
    k_new, v_new = k_new.contiguous(), v_new.contiguous()
    check_triton_inputs(k_new, v_new, pos, layer.keys, layer.values, layer.positions, layer.starts, layer.lengths,
                        kmin, kmax)
    if layer.keys.stride(0) != d or not kmin.is_contiguous() or not kmax.is_contiguous():
        raise ValueError("quest_append_triton needs contiguous rows and bounds")
    _quest_append_kernel[(n_kv,)](k_new, v_new, pos, layer.keys, layer.values, layer.positions, layer.starts,
                                  layer.lengths, kmin, kmax, kmin.stride(0), d, PAGE=page_size,
                                  D_PAD=max(16, next_pow2(d)), num_warps=1)


def quest_page_scores(q, kmin, kmax, n_scored):
    """Page scores: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(q, kmin, kmax, n_scored):
        return quest_page_scores_triton(q, kmin, kmax, n_scored)
    return quest_page_scores_ref(q, kmin, kmax, n_scored)


def _check(q, keys, values, starts, lengths, pages, page_size, softcap=None, window=None, positions=None,
           q_pos=None, log_weight=None):
    check_layout(keys, starts, lengths, values)
    if q.dim() != 2 or q.shape[1] != keys.shape[1]:
        raise ValueError(f"q must be (n_q, d={keys.shape[1]}), got shape {tuple(q.shape)}")
    g = group_size(q.shape[0], starts.numel())
    if pages.dim() != 2 or pages.shape[0] != q.shape[0]:
        raise ValueError(f"pages must be (n_q={q.shape[0]}, K), got shape {tuple(pages.shape)}")
    if not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size={page_size!r}; allowed: a positive integer")
    if log_weight is not None and log_weight.shape != keys.shape[:1]:
        raise ValueError(f"log_weight {tuple(log_weight.shape)} must have one entry per row of keys {keys.shape[0]}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap}; allowed: a positive number or None")
    if window is not None:
        if not window >= 1:
            raise ValueError(f"window={window}; allowed: an integer >= 1 or None")
        if positions is None or q_pos is None:
            raise ValueError("a window needs positions (T,) and q_pos (the new token's position)")
    return g


def selected_rows(pages: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, page_size: int, g: int):
    """(rows (n_q, K * page_size) int64 global row indices, ok (n_q, K * page_size) bool): the rows of each
    query head's selected pages (invalid slots: -1 pages and the missing rows of a partial last page)."""
    n_q, K = pages.shape
    head = torch.arange(n_q, device=pages.device) // g
    local = pages.long().unsqueeze(-1) * page_size + torch.arange(page_size, device=pages.device)  # (n_q, K, P)
    ok = (pages.unsqueeze(-1) >= 0) & (local < lengths[head].view(n_q, 1, 1))
    rows = torch.where(ok, starts[head].view(n_q, 1, 1) + local, 0)
    return rows.view(n_q, -1), ok.view(n_q, -1)


def quest_decode_attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                               lengths: torch.Tensor, pages: torch.Tensor, page_size: int,
                               scaling: float | None = None, softcap: float | None = None,
                               window: int | None = None, positions: torch.Tensor | None = None, q_pos=None,
                               log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: each query head's softmax over the rows of its selected pages, in float32 (batched
    gather, no host sync). Returns (n_q, d) in q's dtype; a head that sees no row outputs 0."""
    g = _check(q, keys, values, starts, lengths, pages, page_size, softcap, window, positions, q_pos, log_weight)
    scaling = resolve_scaling(scaling, q.shape[1])
    rows, ok = selected_rows(pages, starts, lengths, page_size, g)
    k = keys[rows].float()                                        # (n_q, R, d)
    s = torch.einsum("jd,jrd->jr", q.float(), k) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if log_weight is not None:
        s = s + log_weight[rows].float()
    if window is not None:
        qp = q_pos if isinstance(q_pos, torch.Tensor) else torch.tensor(int(q_pos), device=keys.device)
        ok = ok & (positions[rows] > qp.reshape(()) - window)
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                  # a head without rows: all -inf -> 0
    return torch.einsum("jr,jrd->jd", p, values[rows].float()).to(q.dtype)


def quest_decode_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                                  lengths: torch.Tensor, pages: torch.Tensor, page_size: int,
                                  scaling: float | None = None, softcap: float | None = None,
                                  window: int | None = None, positions: torch.Tensor | None = None, q_pos=None,
                                  log_weight: torch.Tensor | None = None, num_splits: int | None = None,
                                  tile_rows: int = 64, num_warps: int = 4) -> torch.Tensor:
    """Triton version of `quest_decode_attention_ref` (same arguments and result); no device sync."""
    g = _check(q, keys, values, starts, lengths, pages, page_size, softcap, window, positions, q_pos, log_weight)
    check_triton_inputs(q, keys, values, starts, lengths)
    n_q, d = q.shape
    K = pages.shape[1]
    dev = q.device
    pages = pages.to(torch.int32).contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    ppt = max(1, tile_rows // page_size)                          # pages per tile
    if num_splits is None:  # about two programs per SM, each at least two tiles
        num_splits = max(1, min(triton.cdiv(K, 2 * ppt), triton.cdiv(num_programs_hint(dev), n_q)))
    d_pad = max(16, next_pow2(d))
    if window is not None:
        if not isinstance(q_pos, torch.Tensor):
            q_pos = torch.tensor([int(q_pos)], dtype=torch.long, device=dev)
        check_triton_inputs(positions, q_pos)
    else:
        positions = q_pos = starts  # unused (HAS_WINDOW=False)
    lw = starts if log_weight is None else log_weight.float()
    work = torch.empty(n_q, num_splits, d_pad + 2, device=dev, dtype=torch.float32)
    _quest_split_kernel[(n_q, num_splits)](
        q, keys, values, starts, lengths, pages, work, positions, q_pos, lw, q.stride(0), keys.stride(0),
        values.stride(0), pages.stride(0), g, d, K, resolve_scaling(scaling, d) * LOG2E, (softcap or 1.0) * LOG2E,
        int(window or 0), PAGE=page_size, PAGES_PER_TILE=ppt, TILE=next_pow2(ppt * page_size),
        NUM_SPLITS=num_splits, D_PAD=d_pad, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        HAS_LOGW=log_weight is not None, num_warps=num_warps)
    out = torch.empty(n_q, d, device=dev, dtype=q.dtype)
    lse = torch.empty(n_q, device=dev, dtype=torch.float32)
    _decode_reduce_kernel[(n_q,)](work, out, lse, out.stride(0), d, NUM_SPLITS=num_splits,
                                  S_PAD=next_pow2(num_splits), D_PAD=d_pad, num_warps=num_warps)
    return out


def quest_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                           lengths: torch.Tensor, pages: torch.Tensor, page_size: int, scaling: float | None = None,
                           **opts) -> torch.Tensor:
    """Attention over the selected pages: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(q, keys, values, starts, lengths, pages):
        return quest_decode_attention_triton(q, keys, values, starts, lengths, pages, page_size, scaling, **opts)
    return quest_decode_attention_ref(q, keys, values, starts, lengths, pages, page_size, scaling, **opts)
