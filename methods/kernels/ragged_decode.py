"""One decode step of attention over the ragged per-head KV cache (batch 1, GQA).

Split-K "flash-decoding" (Dao et al., 2023, "Flash-Decoding for long-context inference"): the keys of
each KV head are cut into NUM_SPLITS chunks; one program per (KV head, chunk) reads each key/value row
once for all g query heads of the group and keeps a running max / sum / weighted-value accumulator
(online softmax, Milakov & Gimelshein 2018); a second kernel merges the chunks of each query head.

With `return_probs=True` it also returns, per cached token, the softmax probability of the new query
summed over the g query heads of its KV head (what H2O accumulates and TOVA ranks at decode time). The split
kernel then also writes every row's final logits (g floats per row, softcap, log-weight and window applied),
and a third small kernel normalizes them with the merged log-sum-exp: exp2(logit - lse), summed over the
group. Why not recompute the logits from the keys (as `colsum` does for a prefill): normalizing needs the
log-sum-exp over all splits, known only after the merge, and re-reading a key costs d values per row (256
bytes at d = 128 in bf16) where the stored logits cost g floats (16 bytes at g = 4) written and read once.

Two options follow transformers' eager attention: `softcap` (Gemma-2: each scaled score x becomes
softcap * tanh(x / softcap)) and `window` (sliding-window layers: the new token at position `q_pos` sees the
rows whose original position, `positions[row]`, is > q_pos - window; rows may be evicted or reordered, so the
window is by position, never by row). The probabilities know both, and the log-weights of merged rows (a
row outside the window has probability 0), as the reference does.
"""
from __future__ import annotations

import torch

from . import (HAS_TRITON, check_layout, check_regions, check_triton_inputs, group_size, next_pow2,
               num_programs_hint, resolve_scaling, use_triton)
from .colsum import LOG2E, _dot_precision

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, starts_ptr, lengths_ptr, work_ptr, pos_ptr, qpos_ptr, lw_ptr,
                             logits_ptr, stride_qh, stride_kt, stride_vt, stride_lg, G, D, scale_log2,
                             softcap_log2, window,
                             NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                             BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LOGW: tl.constexpr,
                             STORE_LOGITS: tl.constexpr):
        # grid: (n_kv, NUM_SPLITS)
        h = tl.program_id(0)
        split = tl.program_id(1)
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        # per-head chunk, a multiple of BLOCK_N: every head's work is spread over all its splits
        chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        # the g query heads of this KV head, padded to G_PAD >= 16 rows for tl.dot
        q = tl.load(q_ptr + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=(offs_g < G)[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        if HAS_WINDOW:
            q_pos = tl.load(qpos_ptr)
        for n0 in range(lo, hi, BLOCK_N):
            rows = n0 + offs_n
            ok = rows < hi
            k = tl.load(k_ptr + (start + rows)[:, None] * stride_kt + offs_d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            if HAS_SOFTCAP:
                # softcap * tanh(x / softcap) of the natural score x = s / log2(e) is, in base 2, c * tanh(s / c)
                # with c = softcap * log2(e); tanh(t) = 2 sigmoid(2t) - 1 (no tanh in tl, and saturates cleanly)
                s = softcap_log2 * (2.0 * tl.sigmoid(2.0 * s / softcap_log2) - 1.0)
            if HAS_LOGW:  # a merged row counts as the tokens it replaces: + log(weight), in base 2
                s = s + tl.load(lw_ptr + start + rows, mask=ok, other=0.0)[None, :] * 1.4426950408889634
            if HAS_WINDOW:  # by original position: rows may be evicted or reordered
                kpos = tl.load(pos_ptr + start + rows, mask=ok, other=0)
                ok = ok & (kpos > q_pos - window)
            s = tl.where(ok[None, :], s, float("-inf"))
            if STORE_LOGITS:  # logits[h*G + r, start + row] (base 2), normalized by _decode_probs_kernel
                tl.store(logits_ptr + (h * G + offs_g)[:, None] * stride_lg + (start + rows)[None, :], s,
                         mask=(offs_g < G)[:, None] & (rows < hi)[None, :])
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a window may hide a whole tile
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (start + rows)[:, None] * stride_vt + offs_d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        # work[h*G + r, split] = (max, sum, acc[0:D_PAD]) of query head h*G + r; empty splits: -inf, 0, 0
        base = ((h * G + offs_g) * NUM_SPLITS + split) * (D_PAD + 2)
        g_ok = offs_g < G
        tl.store(work_ptr + base, m_i, mask=g_ok)
        tl.store(work_ptr + base + 1, l_i, mask=g_ok)
        tl.store(work_ptr + base[:, None] + 2 + offs_d[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def _decode_reduce_kernel(work_ptr, out_ptr, lse_ptr, stride_oh, D,
                              NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, D_PAD: tl.constexpr):
        # grid: (n_q,): merge the splits of one query head
        j = tl.program_id(0)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        s_ok = offs_s < NUM_SPLITS
        base = (j * NUM_SPLITS + offs_s) * (D_PAD + 2)
        m = tl.load(work_ptr + base, mask=s_ok, other=float("-inf"))
        l = tl.load(work_ptr + base + 1, mask=s_ok, other=0.0)
        acc = tl.load(work_ptr + base[:, None] + 2 + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        m_max = tl.max(m, 0)
        m_ref = tl.where(m_max > float("-inf"), m_max, 0.0)  # an empty head has every m = -inf
        w = tl.where(m > float("-inf"), tl.exp2(m - m_ref), 0.0)  # empty splits weigh 0
        den = tl.sum(w * l, 0)
        safe_den = tl.where(den > 0, den, 1.0)
        out = tl.sum(w[:, None] * acc, 0) / safe_den  # an empty head attends to nothing: output 0
        tl.store(out_ptr + j * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)
        tl.store(lse_ptr + j, tl.where(den > 0, m_ref + tl.log2(safe_den), float("-inf")))

    @triton.jit
    def _decode_probs_kernel(logits_ptr, lse_ptr, starts_ptr, lengths_ptr, out_ptr, stride_lg, G, NUM_PROGS,
                             G_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        # grid: (n_kv, NUM_PROGS); program p handles row tiles p, p + NUM_PROGS, ... of its head
        h = tl.program_id(0)
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        offs_g = tl.arange(0, G_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        g_ok = offs_g < G
        lse = tl.load(lse_ptr + h * G + offs_g, mask=g_ok, other=float("-inf"))
        seen = lse > float("-inf")  # a query head that saw no row (empty head, whole window out) gives 0
        lse_safe = tl.where(seen, lse, 0.0)
        for b in range(tl.program_id(1), tl.cdiv(length, BLOCK_N), NUM_PROGS):
            rows = b * BLOCK_N + offs_n
            ok = rows < length
            s = tl.load(logits_ptr + (h * G + offs_g)[:, None] * stride_lg + (start + rows)[None, :],
                        mask=g_ok[:, None] & ok[None, :], other=float("-inf"))
            p = tl.where(seen[:, None], tl.exp2(s - lse_safe[:, None]), 0.0)
            tl.store(out_ptr + start + rows, tl.sum(p, 0), mask=ok)


def _check(q, keys, values, starts, lengths, softcap=None, window=None, positions=None, q_pos=None,
           log_weight=None):
    check_layout(keys, starts, lengths, values)
    if log_weight is not None and log_weight.shape != keys.shape[:1]:
        raise ValueError(f"log_weight {tuple(log_weight.shape)} must have one entry per row of keys {keys.shape[0]}")
    if q.dim() != 2 or q.shape[1] != keys.shape[1]:
        raise ValueError(f"q must be (n_q, d={keys.shape[1]}), got shape {tuple(q.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap}; allowed: a positive number or None")
    if window is not None:
        if not window >= 1:
            raise ValueError(f"window={window}; allowed: an integer >= 1 or None")
        if positions is None or q_pos is None:
            raise ValueError("a window needs positions (T,) and q_pos (the new token's position)")
        if positions.shape != keys.shape[:1]:
            raise ValueError(f"positions {tuple(positions.shape)} must have one entry per row of keys {keys.shape[0]}")
    return group_size(q.shape[0], starts.numel())


def ragged_decode_attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                                lengths: torch.Tensor, scaling: float | None = None, return_probs: bool = False,
                                softcap: float | None = None, window: int | None = None,
                                positions: torch.Tensor | None = None, q_pos=None,
                                log_weight: torch.Tensor | None = None):
    """Torch reference: per KV head, full softmax of its g query heads over its keys, in float32.

    Returns out (n_q, d) in q's dtype, and with `return_probs` also a row-aligned (T,) float32 tensor of
    the probabilities summed over the group (rows outside every head's region are 0). `softcap`: scores
    become softcap * tanh(score / softcap); `window`: only rows with positions[row] > q_pos - window count
    (q_pos: an int or a one-element tensor); `log_weight` (T,): added to each row's score (merged rows).
    A head that sees no row outputs 0.
    """
    g = _check(q, keys, values, starts, lengths, softcap, window, positions, q_pos, log_weight)
    check_regions(keys, starts, lengths)
    scaling = resolve_scaling(scaling, q.shape[1])
    out = torch.zeros_like(q)
    probs = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
    for h, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        s = q[h * g:(h + 1) * g].float() @ keys[a:a + n].float().T * scaling  # (g, n)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if log_weight is not None:
            s = s + log_weight[a:a + n].float()
        if window is not None:
            s = s.masked_fill(positions[a:a + n] <= int(q_pos) - window, float("-inf"))
        if n == 0 or bool(torch.isinf(s).all()):
            continue  # an empty (or wholly out-of-window) head attends to nothing
        p = torch.softmax(s, dim=-1)
        out[h * g:(h + 1) * g] = (p @ values[a:a + n].float()).to(q.dtype)
        probs[a:a + n] = p.sum(0)
    return (out, probs) if return_probs else out


def ragged_decode_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                                   lengths: torch.Tensor, scaling: float | None = None, return_probs: bool = False,
                                   num_splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                                   softcap: float | None = None, window: int | None = None,
                                   positions: torch.Tensor | None = None, q_pos=None,
                                   log_weight: torch.Tensor | None = None):
    """Triton version of `ragged_decode_attention_ref` (same arguments and results).

    No device sync: the split count comes from the buffer size, and region bounds are not re-checked
    (the cache guarantees them; the reference checks them). `q_pos` should be a one-element device tensor
    (an int works too, at the price of a host-to-device copy).
    """
    g = _check(q, keys, values, starts, lengths, softcap, window, positions, q_pos, log_weight)
    check_triton_inputs(q, keys, values, starts, lengths)
    n_q, d = q.shape
    n_kv = starts.numel()
    out_dtype = q.dtype
    q = q.to(keys.dtype)  # tl.dot needs both operands in one dtype
    if q.stride(-1) != 1:
        q = q.contiguous()
    if num_splits is None:
        # about one program per SM (measured best on H100 at 1K-32K tokens), splits of >= 2 tiles
        avg_rows = keys.shape[0] // max(n_kv, 1)
        num_splits = max(1, min(triton.cdiv(avg_rows, 2 * block_n),
                                triton.cdiv(num_programs_hint(q.device) // 2, n_kv)))
    d_pad = max(16, next_pow2(d))
    dev = q.device
    if window is not None:
        if not isinstance(q_pos, torch.Tensor):
            q_pos = torch.tensor([int(q_pos)], dtype=torch.long, device=dev)
        check_triton_inputs(positions, q_pos)
    else:  # unused by the kernel (HAS_WINDOW=False), any pointer will do
        positions = q_pos = starts
    lw = starts if log_weight is None else log_weight.float()
    # one allocation for the partial max, sum and accumulator (host overhead matters at decode)
    work = torch.empty(n_q, num_splits, d_pad + 2, device=dev, dtype=torch.float32)
    # (n_q, T) logits of every row, only written with return_probs (else any pointer will do)
    logits = torch.empty(n_q, keys.shape[0], device=dev, dtype=torch.float32) if return_probs else work
    scale_log2 = resolve_scaling(scaling, d) * LOG2E
    _decode_split_kernel[(n_kv, num_splits)](
        q, keys, values, starts, lengths, work, positions, q_pos, lw, logits, q.stride(0), keys.stride(0),
        values.stride(0), logits.stride(0), g, d, scale_log2, (softcap or 1.0) * LOG2E, int(window or 0),
        NUM_SPLITS=num_splits, G_PAD=max(16, next_pow2(g)), D_PAD=d_pad, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(keys.dtype), HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
        HAS_LOGW=log_weight is not None, STORE_LOGITS=return_probs, num_warps=num_warps)
    out = torch.empty(n_q, d, device=dev, dtype=out_dtype)
    lse = torch.empty(n_q, device=dev, dtype=torch.float32)
    _decode_reduce_kernel[(n_q,)](work, out, lse, out.stride(0), d, NUM_SPLITS=num_splits,
                                  S_PAD=next_pow2(num_splits), D_PAD=d_pad, num_warps=num_warps)
    if not return_probs:
        return out
    probs = torch.zeros(keys.shape[0], device=dev, dtype=torch.float32)  # rows outside every head: 0
    n_progs = max(1, min(triton.cdiv(max(keys.shape[0] // max(n_kv, 1), 1), block_n),
                         triton.cdiv(num_programs_hint(dev), n_kv)))  # programs loop over tiles: any count is right
    _decode_probs_kernel[(n_kv, n_progs)](logits, lse, starts, lengths, probs, logits.stride(0), g, n_progs,
                                          G_PAD=max(2, next_pow2(g)), BLOCK_N=block_n, num_warps=num_warps)
    return out, probs


def ragged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                            lengths: torch.Tensor, scaling: float | None = None, return_probs: bool = False,
                            softcap: float | None = None, window: int | None = None,
                            positions: torch.Tensor | None = None, q_pos=None,
                            log_weight: torch.Tensor | None = None):
    """Decode attention over the ragged cache: Triton on CUDA, torch reference elsewhere."""
    opts = dict(softcap=softcap, window=window, positions=positions, q_pos=q_pos, log_weight=log_weight)
    if use_triton(q, keys, values, starts, lengths):
        return ragged_decode_attention_triton(q, keys, values, starts, lengths, scaling, return_probs, **opts)
    return ragged_decode_attention_ref(q, keys, values, starts, lengths, scaling, return_probs, **opts)
