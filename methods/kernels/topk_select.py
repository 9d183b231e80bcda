"""Top-k selection of a layer's scores on the GPU: each row's k largest, ties towards the earlier token, as
ascending indices (what `kvbench.method.topk_indices` / `ragged_topk_indices` return).

Every scored eviction cuts a layer this way inside the prefill. At a layer's size (8 heads x 8K-32K tokens)
the torch ops are latency-bound: a segmented sort (or torch.topk's radix select) launches a dozen small
kernels, and sorting the kept indices more (~125 us per layer of 8 heads at 8K on an H100, against a few us
of memory traffic: bench/compress_breakdown.py). The rule, per row:
1. a radix select of the row's k-th largest score over order-preserving 32-bit keys (the float's bits, a
   negative's magnitude bits flipped, -0.0 as +0.0 so equal scores tie), 8 bits per pass, 4 passes: each pass
   takes the histogram of the next digit among the keys that match the digits chosen so far;
2. one pass in order: a key above the threshold is kept, a key equal to it is kept while fewer than the ties
   still needed came before it (the earlier token wins, as a stable descending sort), and each kept index is
   written at its running count.
`topk_select_triton` runs it in one launch, one program per row; `topk_select_split_triton`, what `topk_select`
uses, spreads each row over P programs (a layer has only 8 rows for 132 SMs) in 5 launches with no
inter-program sync: see its docstring. `topk_select_ref` is the torch version (the CPU path): a stable
descending sort, then a sort of the kept indices. Tests compare the kernels with it and with a stable sort
written out, under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_triton_inputs, next_pow2, num_programs_hint

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _order_key(x):
        """Float32 -> int64 in [0, 2^32), order-preserving; -0.0 and 0.0 give one key."""
        b = (x + 0.0).to(tl.int32, bitcast=True).to(tl.int64)
        return tl.where(b < 0, -1 - b, b + 2147483648)  # ~b of a negative int32, as int64

    @triton.jit
    def _row_k(k_ptr, k_all, row, PER_ROW: tl.constexpr):
        """Row `row`'s k: its own (a (rows,) tensor), or the one int every row shares."""
        if PER_ROW:
            k = tl.load(k_ptr + row)
        else:
            k = tl.full([], k_all, tl.int64)
        return k

    @triton.jit
    def _first256(hist):
        """The first 256 bins of a 512-bin histogram."""
        return tl.sum(tl.reshape(hist, [2, 256]) * (tl.arange(0, 2) == 0)[:, None], 0)

    @triton.jit
    def _digit_hist(s_row, start, end, prefix, shift, BLOCK: tl.constexpr):
        """The 256-bin histogram of the 8-bit digit at `shift` among the keys of s_row[start:end] whose higher
        digits match `prefix`."""
        offs = tl.arange(0, BLOCK)
        hist = tl.zeros([512], tl.int32)
        for t0 in range(start, end, BLOCK):
            i = t0 + offs
            key = _order_key(tl.load(s_row + i, mask=i < end, other=0.0))
            match = (i < end) & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            # keys outside the prefix fall in bins 256..511, never read
            hist += tl.histogram(tl.where(match, (key >> shift) & 255, 256 + (i & 255)).to(tl.int32), 512)
        return _first256(hist)

    @triton.jit
    def _pick_digit(h, need, prefix, shift):
        """From a digit's histogram h of the keys matching `prefix`: the digit holding the need-th largest, the
        keys still needed among those matching the longer prefix, and that prefix."""
        bins = tl.arange(0, 256)
        above = tl.sum(h, 0) - tl.cumsum(h, 0)  # matching keys with a larger digit
        take = tl.max(tl.where(above + h >= need, bins, -1), 0)
        return take, need - tl.sum(tl.where(bins > take, h, 0), 0), prefix | (take.to(tl.int64) << shift)

    @triton.jit
    def _write_kept(s_row, out_row, start, end, prefix, need, kept, ties, BLOCK: tl.constexpr):
        """s_row[start:end] in order: a key above the threshold `prefix` is kept, a key equal to it while its
        rank among the row's ties is <= need (the earlier token wins); each kept index is written at slot
        kept + its running count. kept / ties: those of the row before `start`."""
        offs = tl.arange(0, BLOCK)
        for t0 in range(start, end, BLOCK):
            i = t0 + offs
            ok = i < end
            key = _order_key(tl.load(s_row + i, mask=ok, other=0.0))
            tie = ok & (key == prefix)
            tie_rank = ties + tl.cumsum(tie.to(tl.int64), 0)  # 1-based among the row's ties so far
            sel = ok & ((key > prefix) | (tie & (tie_rank <= need)))
            slot = kept + tl.cumsum(sel.to(tl.int64), 0) - 1
            tl.store(out_row + slot, i.to(tl.int64), mask=sel)
            kept += tl.sum(sel.to(tl.int64), 0)
            ties += tl.sum(tie.to(tl.int64), 0)

    @triton.jit
    def _topk_select_kernel(s_ptr, k_ptr, k_all, out_ptr, L, stride_s, stride_o, PER_ROW: tl.constexpr,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0)
        k = _row_k(k_ptr, k_all, row, PER_ROW)
        if k > 0:
            prefix = tl.full([], 0, tl.int64)  # the k-th largest key's digits chosen so far
            need = k                            # how many of the keys matching `prefix` are still to keep
            for p in tl.static_range(4):
                h = _digit_hist(s_ptr + row * stride_s, 0, L, prefix, 24 - 8 * p, BLOCK)
                _, need, prefix = _pick_digit(h, need, prefix, 24 - 8 * p)
            _write_kept(s_ptr + row * stride_s, out_ptr + row * stride_o, 0, L, prefix, need,
                        tl.full([], 0, tl.int64), tl.full([], 0, tl.int64), BLOCK)

    # --- the split variant: row r's chunk j (a contiguous range) belongs to program (r, j) of every launch ---

    @triton.jit
    def _split_digit(hist_ptr, q, row, j, rows, P, prefix, need, JB: tl.constexpr):
        """Digit q of the row's threshold, from pass q's chunk histograms summed (hist[q, row, :, :]), chosen as
        `_topk_select_kernel` chooses it. Returns the prefix and need with it, and among the chunks before j the
        keys above the threshold that this digit decides (they matched the prefix, with a larger digit) and the
        keys matching the new prefix (after the last pass: the ties)."""
        bins = tl.arange(0, 256)
        jj = tl.arange(0, JB)
        h = tl.zeros([256], tl.int32)       # every chunk's
        before = tl.zeros([256], tl.int32)  # the chunks before j
        for j0 in range(0, P, JB):  # JB chunks' histograms per load: a few loads, not P
            jr = j0 + jj
            part = tl.load(hist_ptr + ((q * rows + row) * P + jr[:, None]) * 256 + bins[None, :],
                           mask=(jr < P)[:, None], other=0)
            h += tl.sum(part, 0)
            before += tl.sum(tl.where((jr < j)[:, None], part, 0), 0)
        take, need, prefix = _pick_digit(h, need, prefix, 24 - 8 * q)
        above_before = tl.sum(tl.where(bins > take, before, 0), 0).to(tl.int64)
        match_before = tl.sum(tl.where(bins == take, before, 0), 0).to(tl.int64)
        return prefix, need, above_before, match_before

    @triton.jit
    def _split_pass_kernel(s_ptr, k_ptr, k_all, hist_ptr, carry_ptr, L, chunk, rows, P, stride_s,
                           PASS: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr, JB: tl.constexpr):
        """Pass PASS of the radix select: chunk j's histogram of digit PASS among its keys matching the prefix.
        carry[row, j] = (prefix, need, keys of earlier chunks above the threshold so far) goes from this program
        to program (row, j) of the next launch: each launch sums only the previous pass's histograms."""
        row = tl.program_id(0)
        j = tl.program_id(1)
        k = _row_k(k_ptr, k_all, row, PER_ROW)
        if k > 0:  # a k == 0 row is skipped by every launch: its scratch is never written nor read
            c = carry_ptr + (row * P + j) * 3
            if PASS == 0:
                prefix = tl.full([], 0, tl.int64)
                need = k
                above_before = tl.full([], 0, tl.int64)
            else:
                prefix, need, above_before, _ = _split_digit(hist_ptr, PASS - 1, row, j, rows, P, tl.load(c),
                                                             tl.load(c + 1), JB)
                above_before += tl.load(c + 2)
            tl.store(c, prefix)
            tl.store(c + 1, need)
            tl.store(c + 2, above_before)
            start = j * chunk
            end = tl.minimum(start + chunk, L)  # empty past the row's end
            h = _digit_hist(s_ptr + row * stride_s, start, end, prefix, 24 - 8 * PASS, BLOCK)
            tl.store(hist_ptr + ((PASS * rows + row) * P + j) * 256 + tl.arange(0, 256), h)

    @triton.jit
    def _split_write_kernel(s_ptr, k_ptr, k_all, hist_ptr, carry_ptr, out_ptr, L, chunk, rows, P, stride_s,
                            stride_o, PER_ROW: tl.constexpr, BLOCK: tl.constexpr, JB: tl.constexpr):
        """The kept indices of chunk j, in order, after those the chunks before it keep."""
        row = tl.program_id(0)
        j = tl.program_id(1)
        k = _row_k(k_ptr, k_all, row, PER_ROW)
        if k > 0:
            c = carry_ptr + (row * P + j) * 3
            prefix, need, above_before, ties = _split_digit(hist_ptr, 3, row, j, rows, P, tl.load(c), tl.load(c + 1),
                                                            JB)
            kept = tl.load(c + 2) + above_before + tl.minimum(ties, need)  # the ties of earlier chunks go first
            start = j * chunk
            _write_kept(s_ptr + row * stride_s, out_ptr + row * stride_o, start, tl.minimum(start + chunk, L),
                        prefix, need, kept, ties, BLOCK)


def topk_select_ref(scores: torch.Tensor, k: int | torch.Tensor, width: int) -> torch.Tensor:
    """`topk_select_triton` in torch ops, the rule written plainly: a stable descending sort (ties: the earlier
    index), each row's first k[r], sorted ascending (slots past k[r] hold L)."""
    rows, L = scores.shape
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :width]
    k = k.to(torch.long).view(-1, 1) if isinstance(k, torch.Tensor) else k
    first = torch.arange(order.shape[1], device=scores.device).view(1, -1) < k
    return torch.sort(torch.where(first, order, L), dim=-1).values


def topk_select(scores: torch.Tensor, k: int | torch.Tensor, width: int) -> torch.Tensor:
    """The split kernel on CUDA (with Triton), the torch version otherwise. A layer's 8 rows on one program each
    leave most SMs idle: on an H200, 8 rows of 8K tokens take 25 us split, 51 us one program per row, 118 us by
    the two sorts; 8 rows of 32K, 40 / 183 / 129 us (bench/compress_breakdown.py)."""
    from . import use_triton
    if use_triton(scores) and 0 < width:
        return topk_select_split_triton(scores, k, width)
    return topk_select_ref(scores, k, width)


def _kernel_inputs(scores: torch.Tensor, k: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Checked kernel inputs: float32 contiguous scores, the per-row k tensor (or the scores, an unread pointer,
    when one int k serves every row), and whether k is per row."""
    per_row = isinstance(k, torch.Tensor)
    if scores.dim() != 2 or (per_row and k.shape != (scores.shape[0],)):
        raise ValueError(f"scores {tuple(scores.shape)} must be (rows, L) and k an int or (rows,)")
    s = scores.float().contiguous()
    k_rows = k.to(torch.long).contiguous() if per_row else s
    check_triton_inputs(s, k_rows)
    return s, k_rows, per_row


def topk_select_triton(scores: torch.Tensor, k: int | torch.Tensor, width: int, block: int | None = None,
                       num_warps: int | None = None) -> torch.Tensor:
    """(rows, width) int64: row r's k[r] largest of (rows, L) `scores` (ties: the earlier index) as ascending
    indices in its first k[r] slots (later slots undefined). k: one int for every row, or (rows,) int64 on the
    device; each <= L and <= width. One launch, no host sync."""
    s, k_rows, per_row = _kernel_inputs(scores, k)
    if block is None:  # whole 8K-token tiles, 16 warps: the fastest of the tile sizes measured (H100, 8 rows
        # of 8K: 51 us, against 63 with 2048 x 8 warps and 74 with 1024 x 4; bench/compress_breakdown.py)
        block = max(1024, min(8192, next_pow2(s.shape[1])))
    if num_warps is None:
        num_warps = 16 if block >= 8192 else 8
    out = torch.empty(s.shape[0], max(width, 1), dtype=torch.long, device=s.device)
    _topk_select_kernel[(s.shape[0],)](s, k_rows, 0 if per_row else int(k), out, s.shape[1], s.stride(0),
                                       out.stride(0), PER_ROW=per_row, BLOCK=block, num_warps=num_warps)
    return out[:, :width]


def topk_select_split_triton(scores: torch.Tensor, k: int | torch.Tensor, width: int,
                             programs_per_row: int | None = None, block: int | None = None,
                             num_warps: int | None = None) -> torch.Tensor:
    """`topk_select_triton` (same arguments and result) with each row spread over P programs, grid (rows, P):
    program (r, j) owns the j-th contiguous chunk of row r. 5 launches, no atomics, no waiting between programs:
    - passes 0..3: program (r, j) sums the row's P chunk histograms of the previous pass (every program of the
      row the same way) and picks that digit as `topk_select_triton` does, then writes the histogram of the
      next digit among its chunk's matching keys to a (4, rows, P, 256) scratch. The prefix, the ties still
      needed and the keys of chunks before j above the threshold (each decided at the digit where a key first
      exceeds the prefix) pass to program (r, j) of the next launch in a (rows, P, 3) scratch;
    - write: the last digit, the ties in chunks before j, hence the kept indices before chunk j; then its chunk
      in order, each kept index written at that count + its running count (ties: the earlier token wins).
    P: one program per SM over the rows, each chunk >= 128 scores (programs_per_row overrides). No host sync.
    """
    s, k_rows, per_row = _kernel_inputs(scores, k)
    rows, L = s.shape
    if programs_per_row is None:  # one program per SM over the rows (H200, 8 rows, bench/compress_breakdown.py:
        # 16 each, 23 / 26 / 38 us at 2K / 8K / 32K tokens; 32 each, 31 / 32 / 37 us), chunks of >= 128 scores
        programs_per_row = min(num_programs_hint(s.device) // 2 // max(rows, 1), triton.cdiv(L, 128))
        if programs_per_row <= 1:  # rows enough to fill the device: the one-launch kernel does the same scans
            return topk_select_triton(scores, k, width)
    P = max(1, int(programs_per_row))
    chunk = -(-max(L, 1) // P)
    chunk = -(-chunk // 16) * 16  # chunk starts 16-aligned (Triton specializes ints divisible by 16): vector loads
    if block is None:  # a chunk in one tile, up to 2048 scores
        block = max(64, min(2048, next_pow2(chunk)))
    if num_warps is None:
        num_warps = 8 if block >= 2048 else 4
    jb = min(16, next_pow2(P))
    hist = torch.empty(4, rows, P, 256, dtype=torch.int32, device=s.device)  # pass q's: read by pass q + 1 only
    carry = torch.empty(rows, P, 3, dtype=torch.long, device=s.device)       # program (r, j)'s own, launch to launch
    out = torch.empty(rows, max(width, 1), dtype=torch.long, device=s.device)
    k_all = 0 if per_row else int(k)
    for p in range(4):
        _split_pass_kernel[(rows, P)](s, k_rows, k_all, hist, carry, L, chunk, rows, P, s.stride(0), PASS=p,
                                      PER_ROW=per_row, BLOCK=block, JB=jb, num_warps=num_warps)
    _split_write_kernel[(rows, P)](s, k_rows, k_all, hist, carry, out, L, chunk, rows, P, s.stride(0),
                                   out.stride(0), PER_ROW=per_row, BLOCK=block, JB=jb, num_warps=num_warps)
    return out[:, :width]
