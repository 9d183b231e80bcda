"""Timers, memory and analytic decoding FLOPs."""
from __future__ import annotations

import time

import torch


class Timer:
    """Wall time of a block, synchronising the GPU so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.s = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.s = time.perf_counter() - self.t0

    @property
    def ms(self) -> float:
        return self.s * 1e3


def _rss_hwm() -> tuple[int, int]:
    rss = hwm = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


class PeakMemory:
    """Peak memory growth over a block: GPU max allocated, or on CPU the peak RSS growth.

    On Linux writing "5" to /proc/self/clear_refs resets the RSS high-water mark, so each sample gets its
    own peak; where that is not possible the process-wide peak is used (an upper bound).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = _rss_hwm()[0]
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = max(0, _rss_hwm()[1] - self.base)


def linear_flops_per_token(model: torch.nn.Module) -> int:
    """2 × in × out for every Linear the token passes through (projections, MLP, LM head)."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += 2 * m.in_features * m.out_features
    return total


def attention_flops(head_lengths: list[list[int]], group: int, head_dim: int) -> int:
    """One decode step: per query head, QKᵀ and PV over its KV head's kept tokens: 2·2·d·L."""
    return sum(4 * head_dim * L * group for layer in head_lengths for L in layer)


def attention_shape(config) -> tuple[int, int, int]:
    """(n_kv heads, query heads per KV head, head_dim) of a transformers config."""
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    return n_kv, n_q // n_kv, getattr(config, "head_dim", None) or config.hidden_size // n_q


def decode_flops_per_token(model: torch.nn.Module, head_lengths: list[list[int]]) -> int:
    """Analytic matmul FLOPs of one decode step with a cache of the given per-layer/per-head lengths
    (lengths include the token being decoded)."""
    _, group, d = attention_shape(model.config)
    return linear_flops_per_token(model) + attention_flops(head_lengths, group, d)
