"""Decode-time eviction on the device: after a decode step's attention, each head's victim is chosen with
tensor ops only (fixed shapes, no host sync), so a CUDA graph can replay it (kvbench/fast_decode.py).

The rule (`kvbench.fast_decode.DecodeEviction`, declared by the method) gives every row a key, the lowest
evicted first, +inf never:
- rank "position": the row's original position (the oldest goes: StreamingLLM, recent);
- rank "attention": the new token's attention probability of the row, summed over its query group (TOVA);
- rank "score": side data that accumulates every step's attention, this step's included (H2O);
rows at positions < n_sink, and the `recent` newest positions (> q_pos - recent), are never evicted; with
`shared`, one victim per layer from the keys summed over heads, the same row in every head (TOVA's per-layer
choice: every head then holds the same positions in the same rows).

Steady state (`evict_one`): a head holds at most `rows` = cap + 1 rows during a step (the token being
decoded included); a full head's new token overwrites local row `slots[h]` (the append kernel's ring mode).
The victim of a full head is not moved: its local index becomes `slots[h]`, where the next token is written,
and its side data is zeroed (the next row starts with weight 1 and no score). Nothing is shifted, so rows
are in no particular order; the last step's victim is still stored when decoding ends (the caller drops it).

First step over an overfull cache (`evict_down_to`: a question fed on top of the compressed context): each
head drops its n - cap lowest rows at once, then its kept rows move to its front, in order. That is what the
engine loop's repeated argmin does: no key changes between its removals. The counts are known on the host, so
this needs no sync either (this step is never captured: it runs once, before the graph).
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


def evict_one(probs: torch.Tensor | None, positions: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
              slots: torch.Tensor, score: torch.Tensor | None, log_weight: torch.Tensor | None,
              q_pos: torch.Tensor, rows: int, rank: str, n_sink: int = 0, recent: int = 0,
              shared: bool = False) -> None:
    """One step's eviction, in place. probs (T,): the step's attention, row-aligned, 0 outside the heads (None
    when nothing reads it); score (T,): accumulates probs first; rows: cap + 1 (0: nothing is evicted)."""
    if score is not None:
        score.add_(probs)  # the new row's score starts at its first attention, as the engine loop's add_side
    if rows == 0:
        return
    grid, valid = _grid(starts, lengths, rows, positions.numel())
    victim = eviction_keys(grid, valid, positions, probs, score, q_pos, rank, n_sink, recent, shared).argmin(-1)
    full = lengths >= rows
    slots.copy_(torch.where(full, victim, slots))
    # the victim's side data is cleared for the token that will take its row; a head that is not full rewrites
    # its own first row unchanged (its region always has one), so no two heads ever write one row
    dead = starts + torch.where(full, victim, torch.zeros_like(victim))
    for t in (score, log_weight):
        if t is not None:
            t.index_put_((dead,), torch.where(full, torch.zeros((), dtype=t.dtype, device=t.device), t[dead]))


def evict_down_to(probs: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  starts: torch.Tensor, lengths: torch.Tensor, side: dict[str, torch.Tensor],
                  score_name: str | None, q_pos: torch.Tensor, held: list[int], cap: int, rank: str,
                  n_sink: int = 0, recent: int = 0, shared: bool = False) -> None:
    """Evict every head down to `cap` rows, in place. held: the rows each head holds during this step (host
    ints, = the device lengths); kept rows move to the front of their head in order, freed rows' side data
    is zeroed (new tokens are appended there)."""
    from kvbench.cache import long_tensor
    score = side.get(score_name) if score_name is not None else None
    if score is not None:
        score.add_(probs)
    dev, h = keys.device, len(held)
    keep = [min(n, cap) for n in held]
    drop = [n - k for n, k in zip(held, keep)]
    width = max(held)
    grid, valid = _grid(starts, lengths, width, positions.numel())
    key = eviction_keys(grid, valid, positions, probs, score, q_pos, rank, n_sink, recent, shared)
    keep_t, drop_t = long_tensor([keep, drop], dev)
    order = torch.sort(key, dim=-1, stable=True).indices  # lowest first; equal keys in row order
    local = torch.arange(width, device=dev).expand(h, width)
    rank_of = torch.empty_like(order).scatter_(1, order, local)
    kept = valid & (rank_of >= drop_t.unsqueeze(1))
    kept_local = torch.sort(torch.where(kept, local, width), dim=-1).values  # kept rows first, in row order
    # head h's keep[h] rows, heads back to back (sizes known on the host: no sync)
    head = torch.repeat_interleave(torch.arange(h, device=dev), keep_t, output_size=sum(keep))
    j = torch.arange(sum(keep), device=dev) - (torch.cumsum(keep_t, 0) - keep_t)[head]
    src, dst = starts[head] + kept_local[head, j], starts[head] + j
    for t in (keys, values, positions, *side.values()):
        t.index_copy_(0, dst, t.index_select(0, src))  # index_select copies first: moving rows down is safe
    gone = torch.repeat_interleave(torch.arange(h, device=dev), drop_t, output_size=sum(drop))
    freed = starts[gone] + keep_t[gone] + torch.arange(sum(drop), device=dev) - (torch.cumsum(drop_t, 0) - drop_t)[gone]
    for t in side.values():
        t.index_fill_(0, freed, 0)
    lengths.copy_(keep_t)
