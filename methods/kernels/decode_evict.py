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
`merge_victims`); rows at positions < n_sink, and the `recent` newest positions (> q_pos - recent), are never evicted; with
`shared`, one victim per layer from the keys summed over heads, the same row in every head (TOVA's per-layer
choice: every head holds the same positions in the same rows).

A removal is the engine loop's (`LayerKV.remove`): the head's last row moves into the victim's row (its side
data and probability with it), the freed last row's side data is zeroed (the next token is appended there:
weight 1, no score), and the head's length drops by one. Doing exactly what the engine loop does keeps the
rows in the engine loop's order, so equal keys (rows outside a sliding window all have probability 0) pick
the same victim. Each step removes one row per head holding more than `cap`; the first step over a question
fed on top of the compressed context repeats it until every head is back to cap (no key changes between
removals but the moved rows', as in the engine loop's `while` over argmin).
"""
from __future__ import annotations

import math

import torch

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
        grid, valid = _grid(starts, lengths, width, positions.numel())
        key = eviction_keys(grid, valid, positions, probs, score, q_pos, rank, n_sink, recent, shared)
        if rank == "scheduled":  # the row of the scheduled position rank
            nth = ranks[done.clamp(max=ranks.numel() - 1)]
            victim = key.argsort(-1).gather(1, nth.unsqueeze(1)).squeeze(1)
        else:
            victim = key.argmin(-1)
        full = lengths > caps
        if tau is not None:
            merge_victims(keys, values, starts, grid, valid, victim, full, tau, beta)
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
