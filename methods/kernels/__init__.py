"""GPU kernels for the ragged, per-head KV cache, each with a plain torch reference.

Cache layout (one layer, batch 1): `keys (T, d)` and `values (T, d)` are flat-packed per KV head;
head h owns rows `starts[h] : starts[h] + lengths[h]` (int64, regions disjoint, unused rows allowed).
Query head j reads KV head j // g (GQA, n_q = n_kv * g). Keys are post-RoPE.

Per-token scores come back as one float32 tensor of shape (T,) aligned with the rows of `keys`: head h's
scores sit at rows starts[h] : starts[h] + lengths[h], unused rows are 0. For a tightly packed cache
(starts = exclusive cumsum of lengths) that is exactly the concatenation over heads; `per_head` splits it.

Every kernel `x` has `x_ref` (torch; the CPU path and the test oracle), `x_triton` (CUDA tensors, or CPU
tensors when TRITON_INTERPRET=1 was set before triton was imported) and the dispatcher `x`.
"""
from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # CPU-only installs: every dispatcher falls back to its torch reference
    HAS_TRITON = False


# --- helpers shared by the kernel modules (defined before the submodule imports below, which use them) ---

def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule: Triton when it is importable and every tensor lives on a CUDA device."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def check_triton_inputs(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the Triton interpreter."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the *_ref functions or the dispatchers")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for t in tensors:
        if t.dim() == 2 and t.stride(-1) != 1:  # the kernels index rows as base + row * stride_row + col
            raise ValueError(f"Triton kernel got a (T, d) tensor with column stride {t.stride(-1)}; allowed: 1")
        if not t.is_cuda and not interpreting:
            raise ValueError(f"Triton kernel got a tensor on {t.device}; allowed: cuda, or cpu with TRITON_INTERPRET=1")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def num_programs_hint(device: torch.device) -> int:
    """About how many programs keep the device busy (2 per SM); a small constant for the interpreter."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:  # cached: this sits on the per-token decode path
    return torch.cuda.get_device_properties(index).multi_processor_count


def resolve_scaling(scaling: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scaling is None else float(scaling)


def check_layout(keys: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                 values: torch.Tensor | None = None) -> None:
    """Shape/dtype checks only (free: no device sync)."""
    if keys.dim() != 2:
        raise ValueError(f"keys must be (T, d), got shape {tuple(keys.shape)}")
    if values is not None and (values.shape != keys.shape or values.dtype != keys.dtype):
        raise ValueError(f"values {tuple(values.shape)} {values.dtype} must match keys {tuple(keys.shape)} {keys.dtype}")
    for name, t in (("starts", starts), ("lengths", lengths)):
        if t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got shape {tuple(t.shape)} dtype {t.dtype}")
    if starts.shape != lengths.shape:
        raise ValueError(f"starts {tuple(starts.shape)} and lengths {tuple(lengths.shape)} must have the same shape")


def check_regions(keys: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> None:
    """Value checks (one device sync): every head's region lies inside the buffer."""
    s, n = starts.tolist(), lengths.tolist()
    for h, (a, b) in enumerate(zip(s, n)):
        if a < 0 or b < 0 or a + b > keys.shape[0]:
            raise ValueError(f"head {h}: rows {a}:{a + b} outside keys of {keys.shape[0]} rows (need 0 <= start, "
                             "0 <= length, start + length <= T)")


def group_size(n_q: int, n_kv: int) -> int:
    if n_kv < 1 or n_q % n_kv:
        raise ValueError(f"n_q={n_q} query heads is not a multiple of n_kv={n_kv} KV heads")
    return n_q // n_kv


def per_head(flat: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """Split a row-aligned (T,) score tensor into one (lengths[h],) view per head."""
    return [flat[a:a + b] for a, b in zip(starts.tolist(), lengths.tolist())]


from .append import ragged_append, ragged_append_ref, ragged_append_triton  # noqa: E402
from .colsum import attention_colsum, attention_colsum_ref, attention_colsum_triton  # noqa: E402
from .compact import compact, compact_ref, compact_triton  # noqa: E402
from .decode_evict import evict_rows, evict_rows_split, evict_rows_triton, fused_evict_ok  # noqa: E402
from .ragged_decode import (ragged_decode_attention, ragged_decode_attention_ref,  # noqa: E402
                            ragged_decode_attention_triton)
from .topk_select import (topk_select, topk_select_ref, topk_select_split_triton,  # noqa: E402
                          topk_select_triton)
from .window_scores import window_scores, window_scores_ref, window_scores_triton  # noqa: E402

__all__ = [
    "HAS_TRITON", "per_head",
    "ragged_append", "ragged_append_ref", "ragged_append_triton",
    "attention_colsum", "attention_colsum_ref", "attention_colsum_triton",
    "compact", "compact_ref", "compact_triton",
    "evict_rows", "evict_rows_split", "evict_rows_triton", "fused_evict_ok",
    "ragged_decode_attention", "ragged_decode_attention_ref", "ragged_decode_attention_triton",
    "window_scores", "window_scores_ref", "window_scores_triton",
]
