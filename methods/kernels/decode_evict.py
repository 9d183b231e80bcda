"""Decode-time eviction on the device: after a decode step's attention, each head's victim is chosen with
tensor ops only (fixed shapes, no host sync), so a CUDA graph can replay it (kvbench/fast_decode.py).

The rule (`kvbench.fast_decode.DecodeEviction`, declared by the method) gives every row a key, the lowest
evicted first, +inf never:
- rank "position": the row's original position (the oldest goes: StreamingLLM, recent);
- rank "attention": the new token's attention probability of the row, summed over its query group (TOVA);
- rank "score": side data that accumulates every step's attention, this step's included (H2O);
- rank "scheduled": the row whose position has a given rank among the head's rows, the ranks scheduled on the
  host before decoding (`ranks`, one per removal, `done` counts the head's removals so far): for rules that
  depend only on how many rows a head holds, never on the data (LaCache's ladder);
with `pool` > 1 the step's probabilities are first average-pooled over each head's rows in position order
(kernel `pool`, zero padding counted: `kvbench.method.pool1d`), once per step, and the pooled values rank
(CAKE); with `tau` (D2O) each victim is first merged into the most similar other row of its head (see
`merge_victims`); rows at positions < n_sink, and the `recent` newest positions (> q_pos - recent), are never
evicted; with `shared`, one victim per layer from the keys summed over heads, the same row in every head
(TOVA's per-layer choice: every head holds the same positions in the same rows).

A removal is the engine loop's (`LayerKV.remove`): the head's last row moves into the victim's row (its side
data and probability with it), the freed last row's side data is zeroed (the next token is appended there:
weight 1, no score), and the head's length drops by one. Doing exactly what the engine loop does keeps the
rows in the engine loop's order, so equal keys (rows outside a sliding window all have probability 0) pick
the same victim. Each step removes one row per head holding more than `cap`; the first step over a question
fed on top of the compressed context repeats it until every head is back to cap (no key changes between
removals but the moved rows', as in the engine loop's `while` over argmin).

`evict_rows` is the torch version (every case, ~25 small ops per layer); `evict_rows_triton` does the common
case (`fused_evict_ok`: ranks position / attention / score, no pooling, at most one removal with a score) in
one launch per layer, with the same effect bit for bit; CAKE's step (rank attention, pool > 1, no score, not
shared, one removal: each head's rows ranked by position in the kernel, each window summed left to right from
0 and divided by the kernel size, as ATen's avg pooling) in two launches (the ranks by position, counted in
parallel tiles, then the rest), bit for bit too (the pooled values, moved with the rows, and 0 on a head's rows
past the grid's width, as `pool_by_position`; rows outside every head keep their probability, which must be 0,
as for a score); D2O's step (rank score with tau: the merge too) in one launch, the same but for the merged
rows and thresholds, within float32 rounding (the similarities' sums run in another order; the victim, the
merge's destination and whether it merges are the same but where two similarities, or a similarity and tau,
are within a few float32 ulps).
"""
from __future__ import annotations

import math
import struct

import torch

from . import HAS_TRITON, check_layout, check_triton_inputs, next_pow2

RANKS = ("position", "attention", "score", "scheduled")


def _grid(starts: torch.Tensor, lengths: torch.Tensor, width: int, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, width) flat row of each head's local rows 0..width-1 (clamped into the buffer), and which hold a row."""
    local = torch.arange(width, device=starts.device)
    rows = (starts.unsqueeze(1) + local).clamp_(max=n_rows - 1)
    return rows, local.unsqueeze(0) < lengths.unsqueeze(1)


def eviction_keys(rows: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, probs: torch.Tensor | None,
                  score: torch.Tensor | None, q_pos: torch.Tensor, rank: str, n_sink: int = 0, recent: int = 0,
                  shared: bool = False) -> torch.Tensor:
    """(h, width) keys of the rows in `rows`: the lowest is evicted first, +inf never (see the module doc)."""
    if rank not in RANKS:
        raise ValueError(f"rank={rank!r}; allowed: {', '.join(RANKS)}")
    pos = positions[rows]
    if rank in ("position", "scheduled"):
        key = pos.double()  # exact for any position
    else:
        key = (probs if rank == "attention" else score)[rows]
    protect = ~valid
    if n_sink:
        protect = protect | (pos < n_sink)
    if recent:
        protect = protect | (pos > q_pos.view(1, 1) - recent)
    key = key.masked_fill(protect, float("inf"))
    if shared:  # every head holds the same positions in the same rows: one key per row, summed over heads
        key = key.sum(0, keepdim=True).expand_as(key)
    return key


def pool_by_position(probs: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                     width: int, kernel_size: int) -> torch.Tensor:
    """(T,) the probabilities average-pooled over each head's rows in position order (as `pool1d` over the
    head's rows sorted by position), 0 outside the heads. width: the most rows a head holds."""
    from kvbench.method import pool1d
    grid, valid = _grid(starts, lengths, width, positions.numel())
    order = positions[grid].masked_fill(~valid, torch.iinfo(torch.long).max).argsort(-1)  # empty slots last
    p = probs[grid].masked_fill(~valid, 0.0).gather(1, order)  # zeros after a head's rows: pool1d's padding
    pooled = torch.empty_like(p).scatter_(1, order, pool1d(p, kernel_size, "avg")).masked_fill_(~valid, 0.0)
    # each held row appears once in the grid; empty slots (clamped, maybe another head's rows) add 0
    return torch.zeros_like(probs).scatter_add_(0, grid.flatten(), pooled.flatten())


def merge_victims(keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, grid: torch.Tensor,
                  valid: torch.Tensor, victim: torch.Tensor, full: torch.Tensor, tau: torch.Tensor,
                  beta: float) -> None:
    """D2O, before the removal, in place: each evicting head's victim merges into the other row of the head
    whose key is the most similar (cosine) when that similarity reaches the head's threshold tau (h,: an EMA
    of the similarities seen, float64; NaN: unset, the first similarity sets it), with D2O's weights (the
    kept row e, the victim exp(sim): methods/d2o.py's d2o_merge); then tau moves on. As the engine loop's
    `D2O._merge_step`, in the same float32 / float64 arithmetic."""
    src = starts + victim
    a = torch.nn.functional.normalize(keys[src].float(), dim=-1)                  # (h, d)
    b = torch.nn.functional.normalize(keys[grid].float(), dim=-1)                 # (h, width, d)
    sim = torch.bmm(a.unsqueeze(1), b.transpose(1, 2)).squeeze(1)                  # (h, width)
    local = torch.arange(grid.shape[1], device=grid.device)
    sim = sim.masked_fill(~valid | (local == victim.unsqueeze(1)), float("-inf"))
    best, col = sim.max(dim=1)
    tau_now = torch.where(tau.isnan(), best.double(), tau)
    ok = (full & (best >= tau_now.float())).unsqueeze(1)  # the engine compares in float32
    dst = starts + col
    w = best.exp().unsqueeze(1)
    for t in (keys, values):
        merged = (t[dst].float() * math.e + t[src].float() * w) / (math.e + w)
        t.index_copy_(0, dst, torch.where(ok, merged.to(t.dtype), t[dst]))
    tau.copy_(torch.where(full, beta * best.double() + (1 - beta) * tau_now, tau))


def _choose(probs, keys, values, positions, starts, lengths, score, q_pos, caps, width, rank, n_sink, recent,
            shared, ranks, done, tau, beta) -> tuple[torch.Tensor, torch.Tensor]:
    """One removal's choice: (h,) each head's victim (a local row) and whether the head removes it; D2O's
    merge (tau) into the victim's most similar row is done here, before the move."""
    grid, valid = _grid(starts, lengths, width, positions.numel())
    key = eviction_keys(grid, valid, positions, probs, score, q_pos, rank, n_sink, recent, shared)
    if rank == "scheduled":  # the row of the scheduled position rank
        nth = ranks[done.clamp(max=ranks.numel() - 1)]
        victim = key.argsort(dim=-1, stable=True).gather(1, nth.unsqueeze(1)).squeeze(1)  # ties (+inf): row order
    else:
        victim = key.argmin(-1)
    full = lengths > caps
    if tau is not None:
        merge_victims(keys, values, starts, grid, valid, victim, full, tau, beta)
    return victim, full


def evict_rows(probs: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               starts: torch.Tensor, lengths: torch.Tensor, score: torch.Tensor | None,
               log_weight: torch.Tensor | None, q_pos: torch.Tensor, caps: torch.Tensor, width: int, repeat: int,
               rank: str, n_sink: int = 0, recent: int = 0, shared: bool = False, pool: int = 0,
               ranks: torch.Tensor | None = None, done: torch.Tensor | None = None,
               tau: torch.Tensor | None = None, beta: float = 0.0) -> None:
    """After a step's attention, in place: `score` (T,) += probs (T,: the step's attention, row-aligned, 0
    outside the heads; None when nothing reads it), then `repeat` times, every head holding more than its
    `caps[h]` rows (caps: (h,) on the device) removes its lowest-keyed row. width: the most rows an evicting
    head holds now (sizes the fixed-shape grid). pool, ranks, done, tau (with beta): see the module doc."""
    if score is not None:
        score.add_(probs)  # the new row's score starts at its first attention, as the engine loop's add_side
    if pool > 1 and repeat:  # pooled once, then moved with the rows (the engine loop pools once per step)
        probs.copy_(pool_by_position(probs, positions, starts, lengths, width, pool))
    moving = [t for t in (keys, values, positions, probs, score, log_weight) if t is not None]
    for _ in range(repeat):
        victim, full = _choose(probs, keys, values, positions, starts, lengths, score, q_pos, caps, width, rank,
                               n_sink, recent, shared, ranks, done, tau, beta)
        # a head with nothing to evict copies its own first row onto itself (its region always has one row):
        # every head reads and writes only its own rows, so no two heads touch one row
        src = torch.where(full, starts + lengths - 1, starts)
        dst = torch.where(full, starts + victim, starts)
        for t in moving:
            t.index_copy_(0, dst, t.index_select(0, src))  # index_select copies first: a self-copy is a no-op
        for t in (score, log_weight):
            if t is not None:
                t.index_put_((src,), torch.where(full, torch.zeros((), dtype=t.dtype, device=t.device), t[src]))
        lengths.sub_(full.long())
        if done is not None:
            done.add_(full.long())


# --- the fused common case: one Triton launch per layer --------------------------------------------------

FUSED_RANKS = ("position", "attention", "score")


def _unfused_option(rank: str, pool: int, tau, repeat: int, shared: bool, score) -> str | None:
    """The option that keeps a call off the fused kernel (None: the kernel does it)."""
    if rank not in FUSED_RANKS:
        return f"rank={rank!r} (fused: {', '.join(FUSED_RANKS)})"
    if pool > 1 and (rank != "attention" or score is not None or shared or tau is not None or repeat != 1):
        return (f"pool={pool} (fused: pool <= 1, or CAKE's: rank 'attention', no score, not shared, no tau, "
                f"repeat 1)")
    if tau is not None and (rank != "score" or score is None or shared or repeat != 1):
        return "tau (D2O's merging; fused: rank 'score' with a score, not shared, repeat 1)"
    if repeat not in (0, 1) and score is not None:
        return f"repeat={repeat} with a score (fused: 0 or 1; more without a score)"
    if shared and (rank == "score" or score is not None):
        return "shared with a score (fused: shared ranks position / attention, no score)"
    return None


def fused_evict_ok(rank: str, pool: int, tau, repeat: int, shared: bool, score) -> bool:
    """Whether `evict_rows_triton` does this call (else `evict_rows`)."""
    return _unfused_option(rank, pool, tau, repeat, shared, score) is None


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _protected(pos, ok, q_pos, n_sink, recent, HAS_SINK: tl.constexpr, HAS_RECENT: tl.constexpr):
        """Rows that are never evicted: outside the head (or the grid's width), sinks, the recent window."""
        blocked = ~ok
        if HAS_SINK:
            blocked = blocked | (pos < n_sink)
        if HAS_RECENT:
            blocked = blocked | (pos > q_pos - recent)
        return blocked

    @triton.jit
    def _shared_add(j, r, blocked, acc, n_heads, width, pos_ptr, probs_ptr, starts_ptr, lengths_ptr, q_pos, n_sink,
                    recent, RANK: tl.constexpr, HAS_SINK: tl.constexpr, HAS_RECENT: tl.constexpr):
        """Head j's key at local rows r added to acc, and whether it protects them; a head past the last adds 0
        and protects nothing."""
        there = j < n_heads
        start = tl.load(starts_ptr + j, mask=there, other=0)
        length = tl.load(lengths_ptr + j, mask=there, other=0)
        ok = (r < length) & (r < width)
        pos = tl.load(pos_ptr + start + r, mask=ok, other=0)
        if RANK == 0:
            val = pos
        else:
            val = tl.load(probs_ptr + start + r, mask=ok, other=0.0)
        b = _protected(pos, ok, q_pos, n_sink, recent, HAS_SINK, HAS_RECENT) & there
        return blocked | b, acc + tl.where(b | ~there, tl.zeros_like(val), val)

    @triton.jit
    def _move_row(h, victim, k_ptr, v_ptr, pos_ptr, probs_ptr, score_ptr, lw_ptr, done_ptr, starts_ptr,
                  lengths_ptr, caps_ptr, stride_kt, stride_vt, D, HAS_PROBS: tl.constexpr,
                  HAS_SCORE: tl.constexpr, HAS_LOGW: tl.constexpr, HAS_DONE: tl.constexpr, D_PAD: tl.constexpr):
        """LayerKV.remove for head h if it holds more than its cap: its last row moves into row `victim`, the
        freed row's score and log-weight become 0, the length drops by one."""
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        full = length > tl.load(caps_ptr + h)
        src = start + length - 1
        dst = start + victim
        moved = full & (dst != src)  # a last-row victim is a self-copy (a no-op); its score is still zeroed
        offs_d = tl.arange(0, D_PAD)
        cols = offs_d < tl.where(moved, D, 0)  # (a scalar & a vector mask trips the interpreter)
        k = tl.load(k_ptr + src * stride_kt + offs_d, mask=cols)
        v = tl.load(v_ptr + src * stride_vt + offs_d, mask=cols)
        pos = tl.load(pos_ptr + src, mask=moved)
        if HAS_PROBS:
            p = tl.load(probs_ptr + src, mask=moved)
        if HAS_SCORE:
            s = tl.load(score_ptr + src, mask=moved)
        if HAS_LOGW:
            w = tl.load(lw_ptr + src, mask=moved)
        if HAS_DONE:
            n_done = tl.load(done_ptr + h)
        tl.debug_barrier()  # every thread has read the last row (and the counter) before any thread writes
        tl.store(k_ptr + dst * stride_kt + offs_d, k, mask=cols)
        tl.store(v_ptr + dst * stride_vt + offs_d, v, mask=cols)
        tl.store(pos_ptr + dst, pos, mask=moved)
        if HAS_PROBS:
            tl.store(probs_ptr + dst, p, mask=moved)
        if HAS_SCORE:
            tl.store(score_ptr + dst, s, mask=moved)
            tl.store(score_ptr + src, tl.zeros_like(s), mask=full)
        if HAS_LOGW:
            tl.store(lw_ptr + dst, w, mask=moved)
            tl.store(lw_ptr + src, tl.zeros_like(w), mask=full)
        tl.store(lengths_ptr + h, length - 1, mask=full)
        if HAS_DONE:
            tl.store(done_ptr + h, n_done + 1, mask=full)

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        """float32 x in `dtype`, rounded to nearest even as torch's .to(dtype); bfloat16 by hand on the bits
        (what the compiled cast does: the interpreter's own bfloat16 cast truncates)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # finite x: no carry past the sign
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _merge_victim(h, victim, k_ptr, v_ptr, tau_ptr, starts_ptr, lengths_ptr, caps_ptr, stride_kt, stride_vt,
                      D, width, beta_bits, keep_bits, MBLOCK: tl.constexpr, D_PAD: tl.constexpr):
        """`merge_victims` for head h (D2O), before its removal: if the head holds more than its cap, the
        victim's key row's cosine similarity with every other row of the head (float32, rows normalized as
        F.normalize: x / max(||x||, 1e-12)); the first most similar row `col` (torch.max's index on ties, 0
        when there is none); if best >= float32(tau) (tau: the head's threshold, NaN: best), the row `col`'s
        key and value become (col * e + victim * exp(best)) / (e + exp(best)); tau moves on (float64)."""
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        full = length > tl.load(caps_ptr + h)
        src = start + victim
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < tl.where(full, D, 0)  # (a scalar & a vector mask trips the interpreter)
        a = tl.load(k_ptr + src * stride_kt + offs_d, mask=dmask, other=0.0).to(tl.float32)
        a = a / tl.maximum(tl.sqrt(tl.sum(a * a, 0)), 1e-12)
        offs = tl.arange(0, MBLOCK)
        best = tl.full([], float("-inf"), tl.float32)  # running (max similarity, first local row reaching it)
        col = tl.full([], 0, tl.int64)
        n = tl.minimum(tl.where(full, length, 0), width)
        for r0 in range(0, n, MBLOCK):
            r = r0 + offs
            ok = (r < n) & (r != victim)
            b = tl.load(k_ptr + (start + r)[:, None] * stride_kt + offs_d[None, :],
                        mask=ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            b = b / tl.maximum(tl.sqrt(tl.sum(b * b, 1)), 1e-12)[:, None]
            sim = tl.where(ok, tl.sum(b * a[None, :], 1), float("-inf"))
            high = tl.max(sim, 0)
            better = high > best  # strictly: an equal similarity later on never beats the first
            col = tl.where(better, r0 + tl.argmax(sim, 0, tie_break_left=True), col)
            best = tl.where(better, high, best)
        tau = tl.load(tau_ptr + h)
        tau_now = tl.where(tau != tau, best.to(tl.float64), tau)  # NaN: unset, this similarity sets it
        merge = full & (best >= tau_now.to(tl.float32))
        dst = start + col
        cols = offs_d < tl.where(merge, D, 0)
        kd = tl.load(k_ptr + dst * stride_kt + offs_d, mask=cols)
        ks = tl.load(k_ptr + src * stride_kt + offs_d, mask=cols)
        vd = tl.load(v_ptr + dst * stride_vt + offs_d, mask=cols)
        vs = tl.load(v_ptr + src * stride_vt + offs_d, mask=cols)
        w = tl.exp(best)
        e = 2.718281828459045
        km = (kd.to(tl.float32) * e + ks.to(tl.float32) * w) / (e + w)
        vm = (vd.to(tl.float32) * e + vs.to(tl.float32) * w) / (e + w)
        tl.debug_barrier()  # every thread has read both rows before any thread writes the kept one
        tl.store(k_ptr + dst * stride_kt + offs_d, _round_to(km, kd.dtype), mask=cols)
        tl.store(v_ptr + dst * stride_vt + offs_d, _round_to(vm, vd.dtype), mask=cols)
        beta = beta_bits.to(tl.int64).to(tl.float64, bitcast=True)  # float64 weights, passed as their bits
        keep = keep_bits.to(tl.int64).to(tl.float64, bitcast=True)
        tl.store(tau_ptr + h, beta * best.to(tl.float64) + keep * tau_now, mask=full)

    @triton.jit
    def _pool_rank_kernel(pos_ptr, probs_ptr, pooled_ptr, rank_ptr, starts_ptr, lengths_ptr, width,
                          PBLOCK: tl.constexpr):
        """CAKE's pooling, first half, a launch before `_evict_kernel`: grid (n_heads, cdiv(width, PBLOCK)),
        program (h, b) ranks head h's rows b*PBLOCK.. (of its n = min(length, width) rows) by position among
        the head's n rows (positions are distinct within a head) into rank_ptr, and puts each row's
        probability into pooled_ptr at the head's start + rank (the head's rows in position order; scratch
        rows the head's own, so heads never share one). One program per tile of rows: counting a head's
        ranks in one program (O(n^2) serially) cost more than the rest of the step (measured, H100)."""
        h = tl.program_id(0)
        start = tl.load(starts_ptr + h)
        n = tl.minimum(tl.load(lengths_ptr + h), width)
        offs = tl.arange(0, PBLOCK)
        r = tl.program_id(1) * PBLOCK + offs
        ok = r < n
        pos_r = tl.load(pos_ptr + start + r, mask=ok, other=0)
        rank = tl.zeros([PBLOCK], tl.int32)
        for s0 in range(0, n, PBLOCK):
            s = s0 + offs
            pos_s = tl.load(pos_ptr + start + s, mask=s < n, other=0)
            before = (pos_s[None, :] < pos_r[:, None]) & (s < n)[None, :]
            rank += tl.sum(before.to(tl.int32), 1)
        p = tl.load(probs_ptr + start + r, mask=ok, other=0.0)
        tl.store(rank_ptr + start + r, rank, mask=ok)
        tl.store(pooled_ptr + start + rank, p.to(tl.float32), mask=ok)

    @triton.jit
    def _pool_rows(start, r, ok, n, pooled_ptr, rank_ptr, POOL_K: tl.constexpr):
        """CAKE's pooling, second half: rows r's pooled probabilities (0 where not ok), as `pool1d(.., "avg")`
        over the head's rows in position order on the CPU (ATen's avg pooling: the window's values summed left
        to right from 0, the padding skipped, then divided by the kernel size, zero padding counted)."""
        rank = tl.load(rank_ptr + start + r, mask=ok, other=0)
        acc = tl.zeros(r.shape, tl.float32)
        for j in tl.static_range(POOL_K):
            i = rank + (j - POOL_K // 2)
            acc += tl.load(pooled_ptr + start + i, mask=ok & (i >= 0) & (i < n), other=0.0)
        return tl.where(ok, tl.math.div_rn(acc, tl.full(r.shape, POOL_K, tl.float32)), 0.0)

    @triton.jit(do_not_specialize=["beta_bits", "keep_bits"])  # bits, never a constant 1
    def _evict_kernel(k_ptr, v_ptr, pos_ptr, probs_ptr, score_ptr, lw_ptr, done_ptr, starts_ptr, lengths_ptr,
                      caps_ptr, qpos_ptr, tau_ptr, pooled_ptr, rank_ptr, stride_kt, stride_vt, D, n_heads, width,
                      n_sink, recent, beta_bits, keep_bits, RANK: tl.constexpr, MERGE: tl.constexpr,
                      MBLOCK: tl.constexpr, POOL_K: tl.constexpr,
                      SHARED: tl.constexpr, REPEAT: tl.constexpr, HAS_PROBS: tl.constexpr,
                      HAS_SCORE: tl.constexpr, HAS_LOGW: tl.constexpr, HAS_DONE: tl.constexpr,
                      HAS_SINK: tl.constexpr, HAS_RECENT: tl.constexpr, BLOCK: tl.constexpr,
                      D_PAD: tl.constexpr):
        """`evict_rows` with repeat <= 1, ranks position (RANK 0) / attention (1) / score (2), fused: score +=
        probs, the victims' keys and argmin, with MERGE (D2O: RANK 2, repeat 1, not SHARED) the victim's merge
        into its most similar row (`_merge_victim`), with POOL_K > 1 (CAKE: RANK 1, repeat 1, no score, not
        SHARED) the probabilities average-pooled by position first (ranked by `_pool_rank_kernel`, launched
        before, then `_pool_rows`), and the row moves of LayerKV.remove.
        grid: (n_heads,), one program per head; SHARED: (1,), one program for the layer, since every head
        reads every head's keys and the moves of one head must not race with the others' reads."""
        offs = tl.arange(0, BLOCK)
        q_pos = 0
        if HAS_RECENT:
            q_pos = tl.load(qpos_ptr)
        best = tl.full([], float("inf"), tl.float64)  # running (min key, first local row holding it)
        victim = tl.full([], 0, tl.int64)  # all keys +inf: row 0, as torch's argmin
        if SHARED:
            # one key per local row: the sum over heads (+inf if any head protects the row), summed in
            # torch's CUDA order (ATen Reduce.cuh: 4 interleaved accumulators combined in order; for up to 4
            # heads the plain order, the CPU's too); positions are integers, exact in any order
            n = tl.minimum(tl.load(lengths_ptr), width)  # rows past head 0's are +inf in the sum
            for r0 in range(0, n, BLOCK):
                r = r0 + offs
                if RANK == 0:
                    acc0 = tl.zeros([BLOCK], tl.int64)
                else:
                    acc0 = tl.zeros([BLOCK], tl.float32)
                acc1, acc2, acc3 = acc0, acc0, acc0  # 0 + x is x exactly: the same sums as starting at x
                blocked = r < 0
                for j0 in range(0, n_heads, 4):  # accumulator i takes heads i, i + 4, ...
                    blocked, acc0 = _shared_add(j0, r, blocked, acc0, n_heads, width, pos_ptr, probs_ptr,
                                                starts_ptr, lengths_ptr, q_pos, n_sink, recent, RANK, HAS_SINK,
                                                HAS_RECENT)
                    blocked, acc1 = _shared_add(j0 + 1, r, blocked, acc1, n_heads, width, pos_ptr, probs_ptr,
                                                starts_ptr, lengths_ptr, q_pos, n_sink, recent, RANK, HAS_SINK,
                                                HAS_RECENT)
                    blocked, acc2 = _shared_add(j0 + 2, r, blocked, acc2, n_heads, width, pos_ptr, probs_ptr,
                                                starts_ptr, lengths_ptr, q_pos, n_sink, recent, RANK, HAS_SINK,
                                                HAS_RECENT)
                    blocked, acc3 = _shared_add(j0 + 3, r, blocked, acc3, n_heads, width, pos_ptr, probs_ptr,
                                                starts_ptr, lengths_ptr, q_pos, n_sink, recent, RANK, HAS_SINK,
                                                HAS_RECENT)
                key = tl.where(blocked, float("inf"), (((acc0 + acc1) + acc2) + acc3).to(tl.float64))
                low = tl.min(key, 0)
                better = low < best  # strictly: an equal key later on never beats the first
                victim = tl.where(better, r0 + tl.argmin(key, 0, tie_break_left=True), victim)
                best = tl.where(better, low, best)
            if REPEAT:
                tl.debug_barrier()  # all heads' keys are read before any head's rows move
                for j in range(0, n_heads):
                    _move_row(j, victim, k_ptr, v_ptr, pos_ptr, probs_ptr, score_ptr, lw_ptr, done_ptr,
                              starts_ptr, lengths_ptr, caps_ptr, stride_kt, stride_vt, D, HAS_PROBS, HAS_SCORE,
                              HAS_LOGW, HAS_DONE, D_PAD)
        else:
            h = tl.program_id(0)
            start = tl.load(starts_ptr + h)
            length = tl.load(lengths_ptr + h)
            if POOL_K > 1:  # CAKE: the pooled probabilities replace the step's, then rank (RANK 1, no score)
                n = tl.minimum(length, width)  # ranks and the rows in position order: `_pool_rank_kernel`
                for r0 in range(0, length, BLOCK):
                    r = r0 + offs
                    ok = r < n
                    pos = tl.load(pos_ptr + start + r, mask=ok, other=0)
                    pooled = _pool_rows(start, r, ok, n, pooled_ptr, rank_ptr, POOL_K)
                    # rows past the grid's width are outside pool_by_position's grid: 0, as its scatter's
                    tl.store(probs_ptr + start + r, pooled.to(probs_ptr.dtype.element_ty), mask=r < length)
                    blocked = _protected(pos, ok, q_pos, n_sink, recent, HAS_SINK, HAS_RECENT)
                    key = tl.where(blocked, float("inf"), pooled.to(tl.float64))
                    low = tl.min(key, 0)
                    better = low < best
                    victim = tl.where(better, r0 + tl.argmin(key, 0, tie_break_left=True), victim)
                    best = tl.where(better, low, best)
            else:
                for r0 in range(0, length, BLOCK):  # every held row: the score grows past the grid's width too
                    r = r0 + offs
                    ok = r < length
                    pos = tl.load(pos_ptr + start + r, mask=ok, other=0)
                    if RANK == 1 or HAS_SCORE:
                        p = tl.load(probs_ptr + start + r, mask=ok, other=0.0)
                    if HAS_SCORE:  # rows outside the heads have probability 0: only held rows change
                        s = tl.load(score_ptr + start + r, mask=ok, other=0.0) + p
                        tl.store(score_ptr + start + r, s, mask=ok)
                    if REPEAT:
                        if RANK == 0:
                            val = pos.to(tl.float64)  # exact: positions < 2**53
                        elif RANK == 1:
                            val = p.to(tl.float64)  # widening keeps order and ties
                        else:
                            val = s.to(tl.float64)
                        blocked = _protected(pos, ok & (r < width), q_pos, n_sink, recent, HAS_SINK, HAS_RECENT)
                        key = tl.where(blocked, float("inf"), val)
                        low = tl.min(key, 0)
                        better = low < best
                        victim = tl.where(better, r0 + tl.argmin(key, 0, tie_break_left=True), victim)
                        best = tl.where(better, low, best)
            if MERGE:  # D2O (REPEAT, RANK 2): the victim merges into its most similar row first (it reads
                # keys, values and tau, which nothing above wrote)
                _merge_victim(h, victim, k_ptr, v_ptr, tau_ptr, starts_ptr, lengths_ptr, caps_ptr, stride_kt,
                              stride_vt, D, width, beta_bits, keep_bits, MBLOCK, D_PAD)
            if REPEAT:
                # the score (or pooled probability) stores above, and the merged row, which may be the last, are
                # seen by the threads that move the last row
                tl.debug_barrier()
                _move_row(h, victim, k_ptr, v_ptr, pos_ptr, probs_ptr, score_ptr, lw_ptr, done_ptr, starts_ptr,
                          lengths_ptr, caps_ptr, stride_kt, stride_vt, D, HAS_PROBS, HAS_SCORE, HAS_LOGW,
                          HAS_DONE, D_PAD)

    @triton.jit
    def _move_victims_kernel(victim_ptr, k_ptr, v_ptr, pos_ptr, probs_ptr, score_ptr, lw_ptr, done_ptr,
                             starts_ptr, lengths_ptr, caps_ptr, stride_kt, stride_vt, D,
                             HAS_PROBS: tl.constexpr, HAS_SCORE: tl.constexpr, HAS_LOGW: tl.constexpr,
                             HAS_DONE: tl.constexpr, D_PAD: tl.constexpr):
        """grid (n_heads,): head h removes the victim chosen before the launch (`evict_rows_split`)."""
        h = tl.program_id(0)
        _move_row(h, tl.load(victim_ptr + h), k_ptr, v_ptr, pos_ptr, probs_ptr, score_ptr, lw_ptr, done_ptr,
                  starts_ptr, lengths_ptr, caps_ptr, stride_kt, stride_vt, D, HAS_PROBS, HAS_SCORE, HAS_LOGW,
                  HAS_DONE, D_PAD)


    @triton.jit
    def _scheduled_evict_kernel(k_ptr, v_ptr, pos_ptr, probs_ptr, score_ptr, lw_ptr, done_ptr, ranks_ptr, n_ranks,
                                starts_ptr, lengths_ptr, caps_ptr, qpos_ptr, stride_kt, stride_vt, D, width, n_sink,
                                recent, HAS_PROBS: tl.constexpr, HAS_SCORE: tl.constexpr, HAS_LOGW: tl.constexpr,
                                HAS_SINK: tl.constexpr, HAS_RECENT: tl.constexpr, BLOCK: tl.constexpr,
                                D_PAD: tl.constexpr):
        """grid (n_heads,): a scheduled rank's removal (LaCache) in one launch. Head h's victim is where `_choose`
        puts it, `argsort(key)[nth]` over the head's `width` grid rows (key: the position, +inf where protected
        or past the head's length; nth = ranks[min(done[h], n_ranks - 1)]): the candidate row of the nth smallest
        position (distinct within a head: a binary search over positions, a count per probe), or, past the
        candidates, the (nth - candidates)-th +inf row in row order (a stable sort's tie order); then
        `_move_row` removes it if the head is over its cap."""
        h = tl.program_id(0)
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        r = tl.arange(0, BLOCK)
        in_grid = r < width
        ok = in_grid & (r < length)
        pos = tl.load(pos_ptr + start + r, mask=ok, other=0)
        cand = ~_protected(pos, ok, tl.load(qpos_ptr), n_sink, recent, HAS_SINK, HAS_RECENT)
        nth = tl.load(ranks_ptr + tl.minimum(tl.load(done_ptr + h), n_ranks - 1))
        n_cand = tl.sum(cand.to(tl.int64), 0)
        lo = tl.min(tl.where(cand, pos, 2 ** 62), 0)
        hi = tl.max(tl.where(cand, pos, -1), 0)
        while lo < hi:  # the smallest candidate position p with nth + 1 candidates at positions <= p
            mid = lo + (hi - lo) // 2
            enough = tl.sum((cand & (pos <= mid)).to(tl.int64), 0) >= nth + 1
            hi = tl.where(enough, mid, hi)
            lo = tl.where(enough, lo, mid + 1)
        blocked = in_grid & ~cand
        tie = tl.cumsum(blocked.to(tl.int64), 0) - 1  # the +inf rows' order: their row order
        pick = tl.where(nth < n_cand, cand & (pos == lo), blocked & (tie == nth - n_cand))
        victim = tl.sum(tl.where(pick, r, 0).to(tl.int64), 0)
        _move_row(h, victim, k_ptr, v_ptr, pos_ptr, probs_ptr, score_ptr, lw_ptr, done_ptr, starts_ptr,
                  lengths_ptr, caps_ptr, stride_kt, stride_vt, D, HAS_PROBS, HAS_SCORE, HAS_LOGW, True, D_PAD)


def evict_rows_split(probs: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     starts: torch.Tensor, lengths: torch.Tensor, score: torch.Tensor | None,
                     log_weight: torch.Tensor | None, q_pos: torch.Tensor, caps: torch.Tensor, width: int,
                     repeat: int, rank: str, n_sink: int = 0, recent: int = 0, shared: bool = False, pool: int = 0,
                     ranks: torch.Tensor | None = None, done: torch.Tensor | None = None,
                     tau: torch.Tensor | None = None, beta: float = 0.0) -> None:
    """`evict_rows` for the cases the fused kernel does not choose for (a scheduled rank: LaCache; pooling or
    merging outside the fused cases), one removal per step: the choice is `evict_rows`' own torch ops, the row
    moves (about half of its ops) one Triton launch (`_move_victims_kernel`, LayerKV.remove's moves as in the
    fused kernel); a scheduled rank not shared, without pooling or merging (LaCache's), chooses and moves in one
    launch (`_scheduled_evict_kernel`; torch's choice took ~20 small kernels per layer, 1.4x the full cache's
    step on an H200 once the rest of the step got fast). Same effect as `evict_rows`, bit for bit."""
    if repeat != 1:
        raise ValueError(f"evict_rows_split does one removal per step, got repeat={repeat}; use evict_rows")
    if score is not None:
        score.add_(probs)
    d = keys.shape[1]
    if rank == "scheduled" and not shared and pool <= 1 and tau is None and ranks is not None and done is not None:
        extra = [t for t in (probs, score, log_weight) if t is not None]
        check_triton_inputs(keys, values, positions, starts, lengths, caps, ranks, done, q_pos, *extra)
        _scheduled_evict_kernel[(starts.numel(),)](
            keys, values, positions, probs if probs is not None else positions,  # unused pointers: any
            score if score is not None else positions, log_weight if log_weight is not None else positions, done,
            ranks, ranks.numel(), starts, lengths, caps, q_pos, keys.stride(0), values.stride(0), d, int(width),
            int(n_sink), int(recent), HAS_PROBS=probs is not None, HAS_SCORE=score is not None,
            HAS_LOGW=log_weight is not None, HAS_SINK=n_sink > 0, HAS_RECENT=recent > 0,
            BLOCK=max(16, next_pow2(int(width))), D_PAD=max(16, next_pow2(d)), num_warps=4)
        return
    if pool > 1:
        probs.copy_(pool_by_position(probs, positions, starts, lengths, width, pool))
    victim, _ = _choose(probs, keys, values, positions, starts, lengths, score, q_pos, caps, width, rank, n_sink,
                        recent, shared, ranks, done, tau, beta)
    extra = [t for t in (probs, score, log_weight, done) if t is not None]
    check_triton_inputs(keys, values, positions, starts, lengths, caps, victim, *extra)
    _move_victims_kernel[(starts.numel(),)](
        victim, keys, values, positions, probs if probs is not None else positions,  # unused pointers: any
        score if score is not None else positions, log_weight if log_weight is not None else positions,
        done if done is not None else lengths, starts, lengths, caps, keys.stride(0), values.stride(0), d,
        HAS_PROBS=probs is not None, HAS_SCORE=score is not None, HAS_LOGW=log_weight is not None,
        HAS_DONE=done is not None, D_PAD=max(16, next_pow2(d)), num_warps=1)


def evict_rows_triton(probs: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                      positions: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                      score: torch.Tensor | None, log_weight: torch.Tensor | None, q_pos: torch.Tensor,
                      caps: torch.Tensor, width: int, repeat: int, rank: str, n_sink: int = 0, recent: int = 0,
                      shared: bool = False, pool: int = 0, ranks: torch.Tensor | None = None,
                      done: torch.Tensor | None = None, tau: torch.Tensor | None = None, beta: float = 0.0,
                      block: int | None = None, num_warps: int = 4) -> None:
    """`evict_rows` in one launch (CAKE's pooling: two), for the calls `fused_evict_ok` accepts (ValueError
    names the option of any other). Same arguments and effect; `probs` must be 0 on rows outside the heads
    (the decode kernel's are), as only held rows' scores (and, with pool, pooled probabilities) are written.
    No host sync: capturable in a CUDA graph. block: rows per tile."""
    why = _unfused_option(rank, pool, tau, repeat, shared, score)
    if why is not None:
        raise ValueError(f"evict_rows_triton does not fuse {why}; use evict_rows")
    if probs is not None and probs.numel() == 0:
        probs = None
    if probs is None and (rank == "attention" or score is not None):
        raise ValueError(f"rank={rank!r} with score={score is not None} needs the step's probabilities")
    if rank == "score" and score is None:
        raise ValueError("rank='score' needs score (T,)")
    check_layout(keys, starts, lengths, values)
    n_rows = keys.shape[0]
    for name, t in (("positions", positions), ("probs", probs), ("score", score), ("log_weight", log_weight)):
        if t is not None and t.shape != (n_rows,):
            raise ValueError(f"{name} {tuple(t.shape)} must have one entry per row of keys ({n_rows},)")
    if caps.shape != starts.shape or q_pos.numel() != 1:
        raise ValueError(f"caps {tuple(caps.shape)} must be ({starts.numel()},), q_pos one position")
    if tau is not None and (tau.shape != starts.shape or tau.dtype != torch.float64):
        raise ValueError(f"tau {tuple(tau.shape)} {tau.dtype} must be ({starts.numel()},) float64")
    if repeat == 0 and score is None:
        return  # nothing accumulates, nothing is removed
    extra = [t for t in (probs, score, log_weight, done, tau) if t is not None]
    check_triton_inputs(keys, values, positions, starts, lengths, caps, q_pos, *extra)
    n_heads, d = starts.numel(), keys.shape[1]
    if block is None:  # a head's rows in a few tiles (width: about the most an evicting head holds)
        block = max(32, min(1024, next_pow2(width)))
    # no two warps hold one row's score: a copy loaded after another warp's `score += probs` would be wrong
    num_warps = max(1, min(num_warps, block // 32))
    # more than one removal (the first step over a question): one launch each, as evict_rows' loop (the keys
    # do not change between removals but by the moves, which the launches make in the same order)
    for _ in range(max(1, repeat)):
        _launch_evict(keys, values, positions, probs, score, log_weight, done, starts, lengths, caps, q_pos, d,
                      n_heads, width, n_sink, recent, rank, shared, bool(repeat), block, num_warps, tau, beta, pool)


def _float64_bits(x: float) -> int:
    """A float64's bits as an int64 (Triton passes Python floats as float32; the kernel bitcasts them back)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _launch_evict(keys, values, positions, probs, score, log_weight, done, starts, lengths, caps, q_pos, d, n_heads,
                  width, n_sink, recent, rank, shared, repeat, block, num_warps, tau=None, beta=0.0, pool=0):
    d_pad = max(16, next_pow2(d))
    pool = int(pool) if pool > 1 else 0
    # CAKE's pooling: per row, its probability in position order and its rank (scratch, each head its own rows);
    # without pooling the kernel never reads them: any pointer will do, nothing is allocated on the decode path
    pooled, pool_rank = positions, lengths
    if pool:
        pooled = torch.empty(positions.shape[0], dtype=torch.float32, device=keys.device)
        pool_rank = torch.empty(positions.shape[0], dtype=torch.int32, device=keys.device)
        pblock = max(16, min(block, 64))
        _pool_rank_kernel[(n_heads, triton.cdiv(int(width), pblock))](
            positions, probs, pooled, pool_rank, starts, lengths, int(width), PBLOCK=pblock, num_warps=4)
    _evict_kernel[(1 if shared else n_heads,)](
        keys, values, positions, probs if probs is not None else positions,  # unused pointers: any will do
        score if score is not None else positions, log_weight if log_weight is not None else positions,
        done if done is not None else lengths, starts, lengths, caps, q_pos, tau if tau is not None else caps,
        pooled, pool_rank, keys.stride(0), values.stride(0), d, n_heads, int(width), int(n_sink), int(recent),
        _float64_bits(beta), _float64_bits(1 - beta), RANK=FUSED_RANKS.index(rank), MERGE=tau is not None,
        MBLOCK=max(16, min(block, 4096 // d_pad)), POOL_K=pool,
        SHARED=bool(shared), REPEAT=bool(repeat),
        HAS_PROBS=probs is not None, HAS_SCORE=score is not None, HAS_LOGW=log_weight is not None,
        HAS_DONE=done is not None, HAS_SINK=bool(n_sink), HAS_RECENT=bool(recent), BLOCK=block, D_PAD=d_pad,
        num_warps=num_warps)
