"""Decode-time eviction on the device: after a decode step's attention, each head's victim is chosen with
tensor ops only (fixed shapes, no host sync), so a CUDA graph can replay it (kvbench/fast_decode.py).

The rule (`kvbench.fast_decode.DecodeEviction`, declared by the method) gives every row a key, the lowest
evicted first, +inf never:
- rank "position": the row's original position (the oldest goes: StreamingLLM, recent);
- rank "attention": the new token's attention probability of the row, summed over its query group (TOVA);
- rank "score": side data that accumulates every step's attention, this step's included (H2O);
rows at positions < n_sink, and the `recent` newest positions (> q_pos - recent), are never evicted; with
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

import torch

RANKS = ("position", "attention", "score")


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
    if rank == "position":
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


def evict_rows(probs: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               starts: torch.Tensor, lengths: torch.Tensor, score: torch.Tensor | None,
               log_weight: torch.Tensor | None, q_pos: torch.Tensor, cap: int, width: int, repeat: int,
               rank: str, n_sink: int = 0, recent: int = 0, shared: bool = False) -> None:
    """After a step's attention, in place: `score` (T,) += probs (T,: the step's attention, row-aligned, 0
    outside the heads; None when nothing reads it), then `repeat` times, every head holding more than `cap`
    rows removes its lowest-keyed row. width: the most rows a head holds now (sizes the fixed-shape grid)."""
    if score is not None:
        score.add_(probs)  # the new row's score starts at its first attention, as the engine loop's add_side
    moving = [t for t in (keys, values, positions, probs, score, log_weight) if t is not None]
    for _ in range(repeat):
        grid, valid = _grid(starts, lengths, width, positions.numel())
        victim = eviction_keys(grid, valid, positions, probs, score, q_pos, rank, n_sink, recent, shared).argmin(-1)
        full = lengths > cap
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
