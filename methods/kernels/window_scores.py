"""SnapKV observation-window scores over the ragged per-head KV cache.

SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): the last w
prompt tokens (the observation window) attend to all keys; each key's attention is aggregated over the
window queries (and here averaged over the g query heads of its KV head, GQA), then smoothed by a 1-D
pooling (max or avg; kernel_size, padding kernel_size // 2, stride 1) over the prefix, i.e. the keys
before the window. The official code pools `attn[..., :-window]` with `F.max_pool1d` / `F.avg_pool1d`
(avg counts the zero padding: count_include_pad=True, so every average divides by kernel_size); we do the
same, as does the torch path (`kvbench.method.pool1d`). Any kernel_size >= 1: an even one pools the
kernel_size keys from i - kernel_size // 2 to i + kernel_size // 2 - 1 (torch's output i; its extra last
output is dropped).

Result: row-aligned (T,) float32 (see the package docstring). For head h with L = lengths[h]:
rows [0, L - w) hold the pooled prefix scores; rows [L - w, L) (the window, which SnapKV always keeps)
hold their un-pooled mean attention, so callers pick the top-k among the prefix and append the window.

Triton: pass 1 computes every window row's softmax statistics, pass 2 accumulates normalized probabilities
per key tile (both in colsum.py, a KV head's g * w window rows in one tile when they fit), pass 3 pools.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import (HAS_TRITON, check_layout, check_regions, check_triton_inputs, group_size, num_programs_hint,
               resolve_scaling, use_triton)
from .colsum import LOG2E, ragged_colsum_triton, ragged_row_stats_triton

POOLINGS = ("max", "avg")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pool_kernel(sum_ptr, out_ptr, starts_ptr, lengths_ptr, W, inv_count, NUM_PROGS,
                     KERNEL_SIZE: tl.constexpr, IS_MAX: tl.constexpr, BLOCK: tl.constexpr):
        # grid: (n_kv, NUM_PROGS); program p handles blocks p, p + NUM_PROGS, ... of its head
        h = tl.program_id(0)
        start = tl.load(starts_ptr + h)
        length = tl.load(lengths_ptr + h)
        prefix = length - W
        for b in range(tl.program_id(1), tl.cdiv(length, BLOCK), NUM_PROGS):
            pos = b * BLOCK + tl.arange(0, BLOCK)
            raw = tl.load(sum_ptr + start + pos, mask=pos < length, other=0.0)
            if IS_MAX:
                pooled = tl.full((BLOCK,), float("-inf"), tl.float32)
            else:
                pooled = tl.zeros((BLOCK,), tl.float32)
            for o in tl.static_range(KERNEL_SIZE):
                nb = pos + (o - KERNEL_SIZE // 2)
                ok = (nb >= 0) & (nb < prefix)  # pooling sees the prefix only, padded outside it
                if IS_MAX:
                    pooled = tl.maximum(pooled, tl.load(sum_ptr + start + nb, mask=ok, other=float("-inf")))
                else:
                    pooled += tl.load(sum_ptr + start + nb, mask=ok, other=0.0)
            if not IS_MAX:
                pooled = pooled / KERNEL_SIZE
            res = tl.where(pos < prefix, pooled, raw) * inv_count  # sums over g*w rows -> means
            tl.store(out_ptr + start + pos, res, mask=pos < length)


def _check(q_win, keys, starts, lengths, kernel_size, pooling, host_lengths=None):
    """Returns (g, longest head). `host_lengths` (a trusted host copy of `lengths`, e.g. the cache's) skips
    the value checks, which read the device tensors and so wait for the GPU."""
    check_layout(keys, starts, lengths)
    if q_win.dim() != 3 or q_win.shape[2] != keys.shape[1]:
        raise ValueError(f"q_win must be (n_q, w, d={keys.shape[1]}), got shape {tuple(q_win.shape)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; allowed: {', '.join(POOLINGS)}")
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size={kernel_size!r}; allowed: integers >= 1")
    g = group_size(q_win.shape[0], starts.numel())
    if host_lengths is None:
        check_regions(keys, starts, lengths)
    w, lens = q_win.shape[1], (lengths.tolist() if host_lengths is None else list(host_lengths))
    short = [n for n in lens if n < w]
    if short:
        raise ValueError(f"head length {short[0]} < window {w}; allowed: every head holds >= w tokens")
    return g, max(lens, default=0)


def window_scores_ref(q_win: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                      scaling: float | None = None, kernel_size: int = 5, pooling: str = "max") -> torch.Tensor:
    """Torch reference: per KV head the full (g, w, L) causal softmax in float32, mean, then F.*_pool1d."""
    g, _ = _check(q_win, keys, starts, lengths, kernel_size, pooling)
    n_q, w, d = q_win.shape
    scaling = resolve_scaling(scaling, d)
    out = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    for h, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        s = q_win[h * g:(h + 1) * g].float() @ keys[a:a + n].float().T * scaling  # (g, w, n)
        pos = n - w + torch.arange(w, device=keys.device)
        s = s.masked_fill(torch.arange(n, device=keys.device)[None, :] > pos[:, None], float("-inf"))
        mean = torch.softmax(s, dim=-1).mean(dim=(0, 1))  # (n,)
        out[a:a + n] = mean
        if n > w:
            out[a:a + n - w] = pool(mean[None, None, :n - w], kernel_size, stride=1,
                                    padding=kernel_size // 2)[0, 0, :n - w]  # an even kernel: one extra
    return out


def window_scores_triton(q_win: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                         scaling: float | None = None, kernel_size: int = 5, pooling: str = "max",
                         block_m: int = 32, block_n: int = 64, num_warps: int = 4,
                         num_splits: int | None = None, host_lengths: list[int] | None = None,
                         stack: bool | None = None, colsum_programs: int | None = None) -> torch.Tensor:
    """Triton version of `window_scores_ref` (same arguments and result); `num_splits` overrides pass 1's
    split-K count (default: sized to fill the device); `host_lengths`: see `_check` (no device sync); `stack`:
    one tile for a KV head's g * w window rows (colsum.stack_block; default when g * w <= 128);
    `colsum_programs`: pass 2's programs per KV head (see `ragged_colsum_triton`)."""
    g, max_len = _check(q_win, keys, starts, lengths, kernel_size, pooling, host_lengths)
    check_triton_inputs(q_win, keys, starts, lengths)
    n_q, w, d = q_win.shape
    q_win = q_win.to(keys.dtype)
    if q_win.stride(-1) != 1:
        q_win = q_win.contiguous()
    scale_log2 = resolve_scaling(scaling, d) * LOG2E
    stats = ragged_row_stats_triton(q_win, keys, starts, lengths, scale_log2, True, max_len, block_m, block_n,
                                    num_warps, num_splits, stack)
    sums = ragged_colsum_triton(q_win, stats, keys, starts, lengths, scale_log2, True, max_len, block_m, block_n,
                                num_warps, stack, colsum_programs)
    out = torch.zeros_like(sums)
    n_kv = starts.numel()
    block = 256
    n_progs = max(1, min(triton.cdiv(max(max_len, 1), block), triton.cdiv(num_programs_hint(keys.device), n_kv)))
    _pool_kernel[(n_kv, n_progs)](sums, out, starts, lengths, w, 1.0 / (g * w), n_progs,
                                  KERNEL_SIZE=kernel_size, IS_MAX=pooling == "max", BLOCK=block)
    return out


def window_scores(q_win: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                  scaling: float | None = None, kernel_size: int = 5, pooling: str = "max") -> torch.Tensor:
    """SnapKV window scores, row-aligned (T,): Triton on CUDA, torch reference elsewhere."""
    if use_triton(q_win, keys, starts, lengths):
        return window_scores_triton(q_win, keys, starts, lengths, scaling, kernel_size, pooling)
    return window_scores_ref(q_win, keys, starts, lengths, scaling, kernel_size, pooling)
