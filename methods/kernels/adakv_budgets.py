"""AdaKV's per-head kept counts on the device: the safeguard mix of `kvbench.methods.adakv.safeguard_mix` (the host
version, the reference) from a layer's (2, n_kv) window / global top-k counts, bit for bit, as the (3, n_kv) layout
the cut keeps (starts: the counts' exclusive cumsum, lengths, caps: the counts), so the prefill never reads the
counts back per layer. Per head h, with f its +inf (window) tokens, c its share of the global top-k, B the layer's
budget, L its tokens:
- base = max(0, B - f), room = L - f, total = sum(base); total == 0: keep min(f, B);
- raw = c * (1 - alpha) + int(base * alpha): the int in float64 (Python's), raw in float32 (the host's torch ops);
  out = min(round(raw), room) (half to even);
- while sum(out) < total: +1 to the head with room left whose raw - out is largest (ties: the earlier head);
  while sum(out) > total: -1 to the head with out > 0 whose raw - out is smallest (ties: the earlier head);
- keep out + f.
`adakv_budgets_triton` (the mix alone, tested directly; `adakv_layout` runs the same mix inside
`_budgets_topk_kernel`) runs it in one program (n_kv <= 1024 lanes, the corrections as a loop over float64
residuals updated as the host updates them): exact for any input. `adakv_budgets_ref` is the torch version (CPU,
and CUDA without Triton), with no loop: head h's j-th one-token step has the key j - (raw - out) (growing) or
raw - out + j (shrinking); the greedy loop takes the smallest key in turn (ties: the earlier head) and each head's
keys increase, so it takes the first |sum(out) - total| steps of one stable sort of every head's first 2 n_kv
steps. `ref_exact` says where that is the host's answer:
- |sum(out) - total| <= 2 n_kv: each raw is a float32 product then sum (relative errors 2^-24 each, 1 - alpha's
  too), so raw_h is within 2^-24 (3 c_h + base_h) of c_h (1 - alpha) + int(base_h alpha): with n_kv * B <=
  REF_MAX_TOTAL (2^20) within 1/4 per head and in all; then sum(raw) lies in (total - n_kv - 1/4, total + 1/4],
  rounding moves it by n_kv / 2 at most, and no raw reaches room + 1/2 (the clamp never binds);
- every key exact in float64 (the host steps its residuals by +-1 in float64, rounding each time): raw is 0 or
  >= 2^-17 when alpha == 1 or 1 - alpha >= 2^-17, so raw's last bit is >= 2^-40 and |raw - out - j| < 2^11.
Elsewhere AdaKV reads the counts on the host (its path before this module).
`adakv_layout` is the whole layout from a layer's scores. Where the Triton kernels run it takes 3 launches besides
the global top-k's (in place of ~20 small torch ops): `_window_kernel` (each head's +inf tokens, the global top-k's
k and the scores it ranks; references `window_counts_ref`), the top-k, and `_budgets_topk_kernel`, the mix above
with each head's share of the top-k counted in the same program (`head_shares_ref`). Elsewhere its torch version,
`adakv_budgets_ref(global_topk_counts(...))`.
"""
from __future__ import annotations

import struct

import torch

from . import HAS_TRITON, check_triton_inputs, next_pow2

REF_MAX_TOTAL = 1 << 20  # n_kv * budget up to which the torch version's correction width (2 n_kv) is exact
MAX_HEADS = 1024          # lanes of the Triton program

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mix_store(f, c, i, ok, budget, L, alpha_bits, one_minus_alpha, out_ptr, h, BLOCK: tl.constexpr):
        """The mix of head lanes i (ok: i < h) from their +inf tokens f and global top-k shares c, stored as the
        (3, h) layout."""
        base = tl.where(ok, tl.maximum(budget - f, 0), 0)
        room = L - f
        total = tl.sum(base, 0)
        alpha = tl.full([], alpha_bits, tl.int64).to(tl.float64, bitcast=True)  # the float64 alpha, exactly
        floor_cap = (base.to(tl.float64) * alpha).to(tl.int64)                   # int(): truncation, base >= 0
        raw = c.to(tl.float32) * one_minus_alpha + floor_cap.to(tl.float32)      # no FMA: see the launch
        r = tl.floor(raw)
        up = (raw - r > 0.5) | ((raw - r == 0.5) & (r.to(tl.int64) % 2 == 1))   # torch.round: half to even
        out = tl.minimum(r + up.to(tl.float32), room.to(tl.float32)).to(tl.int64)
        out = tl.where(ok, out, 0)
        resid = raw.to(tl.float64) - out.to(tl.float64)  # float64, updated step by step as the host's
        diff = total - tl.sum(out, 0)
        while diff > 0:   # +1 to the head rounded down the most (then the earlier) that has room
            key = tl.where(ok & (out < room), resid, float("-inf"))
            pick = i == tl.min(tl.where(ok & (key == tl.max(key, 0)), i, BLOCK), 0)
            out += pick.to(tl.int64)
            resid = tl.where(pick, resid - 1.0, resid)
            diff -= 1
        while diff < 0:   # -1 to the head rounded up the most (then the earlier) that has a token
            key = tl.where(ok & (out > 0), resid, float("inf"))
            pick = i == tl.min(tl.where(ok & (key == tl.min(key, 0)), i, BLOCK), 0)
            out -= pick.to(tl.int64)
            resid = tl.where(pick, resid + 1.0, resid)
            diff += 1
        kept = tl.where(total == 0, tl.minimum(f, budget), out + f)
        kept = tl.where(ok, kept, 0)
        tl.store(out_ptr + i, tl.cumsum(kept, 0) - kept, mask=ok)
        tl.store(out_ptr + h + i, kept, mask=ok)
        tl.store(out_ptr + 2 * h + i, kept, mask=ok)

    @triton.jit
    def _budgets_kernel(stats_ptr, out_ptr, h, budget, L, alpha_bits, one_minus_alpha, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        ok = i < h
        f = tl.load(stats_ptr + i, mask=ok, other=0)      # +inf (window) tokens per head
        c = tl.load(stats_ptr + h + i, mask=ok, other=0)  # share of the global top-k
        _mix_store(f, c, i, ok, budget, L, alpha_bits, one_minus_alpha, out_ptr, h, BLOCK)

    @triton.jit
    def _window_kernel(s_ptr, masked_ptr, forced_ptr, total_ptr, L, stride_s, budget, BLOCK: tl.constexpr):
        """Program h: row h's +inf tokens (stored, and its free budget added to the zeroed total) and the row with
        them as -inf, as float32, at masked[h * L:]."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        n = tl.zeros([BLOCK], tl.int64)
        for t0 in range(0, L, BLOCK):
            j = t0 + offs
            ok = j < L
            x = tl.load(s_ptr + row * stride_s + j, mask=ok, other=0.0).to(tl.float32)
            inf = x == float("inf")
            n += (ok & inf).to(tl.int64)
            tl.store(masked_ptr + row * L + j, tl.where(inf, float("-inf"), x), mask=ok)
        f = tl.sum(n, 0)
        tl.store(forced_ptr + row, f)
        tl.atomic_add(total_ptr, tl.maximum(budget - f, 0))  # integers: the same sum in any order

    @triton.jit
    def _budgets_topk_kernel(forced_ptr, kept_ptr, out_ptr, h, budget, L, alpha_bits, one_minus_alpha,
                             BLOCK: tl.constexpr, SLOTS: tl.constexpr):
        """`_budgets_kernel` with each head's share of the global top-k counted here: the heads (index // L) of
        its first total kept indices, SLOTS at a time."""
        i = tl.arange(0, BLOCK)
        ok = i < h
        f = tl.load(forced_ptr + i, mask=ok, other=0)
        total = tl.sum(tl.where(ok, tl.maximum(budget - f, 0), 0), 0)  # the global top-k's k
        c = tl.zeros([BLOCK], tl.int32)
        for t0 in range(0, total, SLOTS):
            j = t0 + tl.arange(0, SLOTS)
            valid = j < total  # slots past k are undefined
            idx = tl.load(kept_ptr + j, mask=valid, other=0)
            c += tl.histogram((idx // L).to(tl.int32), BLOCK, mask=valid)
        _mix_store(f, c.to(tl.int64), i, ok, budget, L, alpha_bits, one_minus_alpha, out_ptr, h, BLOCK)


def _check(stats: torch.Tensor, budget: int, L: int, alpha: float) -> None:
    if stats.dim() != 2 or stats.shape[0] != 2 or stats.dtype != torch.int64:
        raise ValueError(f"stats must be (2, n_kv) int64 (window and global top-k counts), got "
                         f"{tuple(stats.shape)} {stats.dtype}")
    if not 0 < budget <= L or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need 0 < budget <= L and 0 <= alpha <= 1, got budget={budget}, L={L}, alpha={alpha}")


def adakv_budgets_ref(stats: torch.Tensor, budget: int, L: int, alpha: float) -> torch.Tensor:
    """(3, n_kv) int64 on the stats' device: starts, kept counts, kept counts (see the module docstring), in torch
    ops with no host read. The host's answer where `ref_exact` holds and stats are as `global_topk_counts` gives
    them (the counts sum to the heads' free budgets, none above its room)."""
    _check(stats, budget, L, alpha)
    f, c = stats[0], stats[1]
    h, dev = f.shape[0], f.device
    base = (budget - f).clamp(min=0)
    room = L - f
    total = base.sum()
    floor_cap = (base.double() * alpha).long()  # Python's int(base * alpha)
    raw = c * (1.0 - alpha) + floor_cap         # float32, as the host's torch ops
    out = torch.minimum(torch.round(raw), room.to(raw.dtype)).long()
    diff = total - out.sum()
    # the corrections: each head's first w one-token steps keyed as the greedy loop picks them (smallest first,
    # ties: the earlier head, as a stable sort of the head-major keys); steps past a head's room / tokens last
    w = 2 * h
    j = torch.arange(w, device=dev)
    resid = (raw.double() - out).unsqueeze(1)
    grow = diff > 0
    key = torch.where(grow, j - resid, resid + j)
    key = key.masked_fill(j >= torch.where(grow, room - out, out).unsqueeze(1), float("inf"))
    first = key.view(-1).argsort(stable=True)[:w] // w  # the heads of the first w steps taken
    steps = ((first == torch.arange(h, device=dev).unsqueeze(1)) & (j < diff.abs())).sum(1)
    kept = torch.where(total == 0, f.clamp(max=budget), out + torch.where(grow, steps, -steps) + f)
    return torch.stack([kept.cumsum(0) - kept, kept, kept])


def adakv_budgets_triton(stats: torch.Tensor, budget: int, L: int, alpha: float) -> torch.Tensor:
    """`adakv_budgets_ref` as one Triton program, exact for any budget (n_kv <= MAX_HEADS). One launch, no sync."""
    _check(stats, budget, L, alpha)
    stats = stats.contiguous()
    check_triton_inputs(stats)
    h = stats.shape[1]
    if h > MAX_HEADS:
        raise ValueError(f"adakv_budgets_triton: {h} heads; allowed: at most {MAX_HEADS}")
    out = torch.empty(3, h, dtype=torch.long, device=stats.device)
    alpha = float(alpha)
    alpha_bits = struct.unpack("<q", struct.pack("<d", alpha))[0]
    # enable_fp_fusion=False: raw is a float32 product then a sum, each rounded, as torch computes it (an FMA would
    # round once)
    _budgets_kernel[(1,)](stats, out, h, budget, L, alpha_bits, 1.0 - alpha, BLOCK=max(16, next_pow2(h)),
                          num_warps=1, enable_fp_fusion=False)
    return out


# --- the whole device layout of a layer: window counts, the global top-k, the mix with the top-k's shares counted ---

def window_counts_ref(scores: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For (n_kv, L) scores: the (n_kv * L,) float32 scores with the +inf (window) tokens as -inf (what the global
    top-k ranks), each head's +inf tokens (n_kv,) and the global top-k's k, sum(max(budget - f, 0)), as (1,);
    int64, on the scores' device, no host read."""
    s = scores.float()
    forced = s == float("inf")
    n_forced = forced.sum(dim=1)
    total = (budget - n_forced).clamp(min=0).sum()
    return torch.where(forced, float("-inf"), s).reshape(-1), n_forced, total.view(1)


def head_shares_ref(kept: torch.Tensor, total: torch.Tensor, h: int, L: int) -> torch.Tensor:
    """(h,) int64: how many of the global top-k's first `total` kept indices (into h rows of L, flattened) fall in
    each row; slots past total are undefined."""
    valid = torch.arange(kept.shape[0], device=kept.device) < total
    head = torch.div(kept, L, rounding_mode="floor")
    return ((head.unsqueeze(0) == torch.arange(h, device=kept.device).unsqueeze(1)) & valid).sum(dim=1)


def window_counts_triton(scores: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`window_counts_ref` in one launch (one program per head; the total by integer atomics) and a zeroing."""
    if scores.dim() != 2 or scores.stride(1) != 1:
        scores = scores.reshape(scores.shape[0], -1).contiguous()
    check_triton_inputs(scores)
    h, L = scores.shape
    masked = torch.empty(h * L, dtype=torch.float32, device=scores.device)
    forced = torch.empty(h, dtype=torch.long, device=scores.device)
    total = torch.zeros(1, dtype=torch.long, device=scores.device)
    _window_kernel[(h,)](scores, masked, forced, total, L, scores.stride(0), budget,
                         BLOCK=max(16, min(4096, next_pow2(L))), num_warps=4)
    return masked, forced, total


def adakv_budgets_topk_triton(forced: torch.Tensor, kept: torch.Tensor, budget: int, L: int,
                              alpha: float) -> torch.Tensor:
    """`adakv_budgets_triton` of (forced, head_shares_ref(kept, total, h, L)): the (3, n_kv) layout from each
    head's +inf tokens and the global top-k's kept indices, the shares counted in the same one program."""
    _check(forced.expand(2, -1), budget, L, alpha)  # (a view: no copy)
    forced, kept = forced.contiguous(), kept.contiguous()
    check_triton_inputs(forced, kept)
    h = forced.shape[0]
    if h > MAX_HEADS or kept.dim() != 1 or kept.dtype != torch.long:
        raise ValueError(f"adakv_budgets_topk_triton: {h} heads (at most {MAX_HEADS}), kept {tuple(kept.shape)} "
                         f"{kept.dtype} (1-D int64)")
    out = torch.empty(3, h, dtype=torch.long, device=forced.device)
    alpha = float(alpha)
    alpha_bits = struct.unpack("<q", struct.pack("<d", alpha))[0]
    _budgets_topk_kernel[(1,)](forced, kept, out, h, budget, L, alpha_bits, 1.0 - alpha,
                               BLOCK=max(16, next_pow2(h)), SLOTS=1024, num_warps=4, enable_fp_fusion=False)
    return out


def adakv_layout(scores: torch.Tensor, budget: int, alpha: float) -> torch.Tensor:
    """The (3, n_kv) layout of a layer's cut from its (n_kv, L) scores, no host read: where the Triton kernels run,
    the window counts (1 launch + a zeroing), the global top-k (methods/kernels/topk_select.py) and the mix
    counting each head's share of it (1 launch), in place of ~20 small torch launches; elsewhere
    `adakv_budgets_ref(global_topk_counts(...))` (kvbench.methods.adakv), the reference."""
    from . import use_triton
    from .topk_select import topk_select
    h, L = scores.shape
    if use_triton(scores) and h <= MAX_HEADS:
        masked, forced, total = window_counts_triton(scores, budget)
        kept = topk_select(masked.view(1, -1), total, h * budget)[0]
        return adakv_budgets_topk_triton(forced, kept, budget, L, alpha)
    from kvbench.methods.adakv import global_topk_counts
    return adakv_budgets_ref(global_topk_counts(scores, budget), budget, L, alpha)


def ref_exact(n_kv: int, budget: int, alpha: float) -> bool:
    """Whether `adakv_budgets_ref` gives the host's counts for a layer of n_kv heads, this budget and alpha (see
    the module docstring)."""
    return n_kv * budget <= REF_MAX_TOTAL and n_kv <= MAX_HEADS and (alpha == 1.0 or 1.0 - alpha >= 2.0 ** -17)


def exact_on(device: torch.device, n_kv: int, budget: int, alpha: float) -> bool:
    """Whether `adakv_layout` gives the host's counts there: the Triton programs always, the torch version
    where `ref_exact` holds."""
    from . import HAS_TRITON
    return (HAS_TRITON and device.type == "cuda" and n_kv <= MAX_HEADS) or ref_exact(n_kv, budget, alpha)
