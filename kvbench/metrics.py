"""Timers, memory and analytic decoding FLOPs."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import time

import torch


def cuda_devices(device) -> list[torch.device]:
    """The CUDA devices among `device` (one, or several: a model spread over GPUs)."""
    devs = device if isinstance(device, (list, tuple)) else [device]
    return [d for d in devs if d.type == "cuda"]


def synchronize(devices: list[torch.device]) -> None:
    for d in devices:  # torch.cuda.synchronize() alone waits for the current device only
        torch.cuda.synchronize(d)


@contextlib.contextmanager
def gc_paused(collect: bool = True):
    """Python's cyclic garbage collector held off inside a timed block, as `timeit` does. A full collection
    walks every object of the process (torch, transformers, Triton: ~200 ms on a 2-core CPU) and starts
    whenever allocation counts say so, so it could land inside any prefill or decode step and be charged to
    whichever method ran there. collect=True first collects the young generations (cheap; cycles left by the
    previous sample, GPU tensors included, are freed before, not during, the block). The collector's state is
    restored after, so blocks nest. (It did not explain the spread of back-to-back 8K prefills on an H200:
    that was the card itself, see bench/ttft_overhead.py --rest-ms.)"""
    if collect:
        gc.collect(1)
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Timer:
    """Wall time of a block, synchronising the GPU(s) so queued kernels are counted. `device`: one device or a
    list (every GPU of a model spread over several). The garbage collector is held off inside (`gc_paused`;
    collect=False skips the young-generation collection before, for blocks timed back to back such as decode
    steps: the collector then runs between them, outside the timing)."""

    def __init__(self, device, collect: bool = True):
        self.gpus = cuda_devices(device)
        self.collect = collect
        self.s = 0.0

    def __enter__(self):
        self._gc = gc_paused(self.collect)
        self._gc.__enter__()
        synchronize(self.gpus)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        try:
            synchronize(self.gpus)
            self.s = time.perf_counter() - self.t0
        finally:
            self._gc.__exit__(None, None, None)

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


def fixed_mmap_threshold() -> None:
    """Make every large CPU tensor visible in RSS (tests only). glibc raises its mmap threshold after a large
    block is freed and then serves later large tensors from memory it kept, with no RSS growth, so a CPU peak
    (RSS growth) undercounts memory the process reuses. A fixed threshold (mallopt M_MMAP_THRESHOLD = 128 KiB)
    gives each large tensor its own mapping, at a price: a 1.5K-token prefill of the embedded model ran ~40%
    slower, which is why kvbench never sets it for a timed run. Irreversible for the process."""
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3 = M_MMAP_THRESHOLD


class PeakMemory:
    """Peak memory growth over a block: GPU max allocated, or on CPU the peak RSS growth.

    On Linux writing "5" to /proc/self/clear_refs resets the RSS high-water mark, so each sample gets its
    own peak; where that is not possible the process-wide peak is used (an upper bound). CPU peaks are RSS
    growth: memory the process frees and reuses (glibc keeps it) does not show again, so they are a lower
    bound of what the block allocated; GPU peaks are the allocator's exact figures.
    Copies the harness makes (a shared context cloned for one query, a forked method) run inside
    `uncounted()`: what they allocate is left out of the peak for the rest of the block.
    """

    def __init__(self, device):
        self.gpus = cuda_devices(device)  # several: a model spread over GPUs; `peak` sums their peaks
        self.cuda = bool(self.gpus)
        self.peak = 0
        self.excluded = 0  # bytes allocated inside uncounted() blocks
        self.per_device: dict[str, int] = {}  # with several GPUs: each one's own peak growth

    def _now(self) -> int:
        if self.cuda:
            synchronize(self.gpus)
            return sum(torch.cuda.memory_allocated(d) for d in self.gpus)
        return _rss_hwm()[0]

    def _high(self) -> int:
        if self.cuda and len(self.gpus) > 1:
            for d in self.gpus:
                k = str(d)
                grow = torch.cuda.max_memory_allocated(d) - self._base_dev.get(k, 0)
                self.per_device[k] = max(self.per_device.get(k, 0), grow)
        return sum(torch.cuda.max_memory_allocated(d) for d in self.gpus) if self.cuda else _rss_hwm()[1]

    def _reset_high(self) -> None:
        if self.cuda:
            for d in self.gpus:
                torch.cuda.reset_peak_memory_stats(d)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def __enter__(self):
        self._now()  # (syncs the GPU)
        self._reset_high()
        self.base = self._now()
        self._base_dev = {str(d): torch.cuda.memory_allocated(d) for d in self.gpus}
        _ACTIVE.append(self)
        return self

    def held_elsewhere(self, nbytes: int) -> None:
        """This block now uses `nbytes` that were allocated before it began, so the allocator's counters do not
        show them as growth (a CUDA-graph prefill's store and private pool, allocated when captured and reused
        by every later sample): the peak is at least what is allocated now above the base plus those bytes."""
        if nbytes > 0:
            self.peak = max(self.peak, self._now() - self.base - self.excluded + int(nbytes))

    def _close_segment(self) -> None:
        self._now()
        self.peak = max(self.peak, self._high() - self.base - self.excluded)

    @contextlib.contextmanager
    def uncounted(self):
        self._close_segment()
        before = self._now()
        try:
            yield
        finally:
            self.excluded += max(0, self._now() - before)
            self._reset_high()

    def __exit__(self, *exc):
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._close_segment()
        self.peak = max(0, self.peak)


_ACTIVE: list[PeakMemory] = []  # the PeakMemory blocks open now, innermost last


def active_peak_memory() -> PeakMemory | None:
    """The innermost open `PeakMemory` block, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def held_elsewhere(nbytes: int) -> None:
    """Tell the innermost open `PeakMemory` block (if any) what it uses beyond its allocator growth (see
    `PeakMemory.held_elsewhere`)."""
    if _ACTIVE:
        _ACTIVE[-1].held_elsewhere(nbytes)


# Config fields that hold the number of routed experts each token goes to (transformers 5 maps most of them onto
# `num_experts_per_tok` through attribute_map; the rest cover remote-code / older configs).
_TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "moe_k", "num_experts_per_token")


def _experts_per_token(model: torch.nn.Module) -> int | None:
    """Routed experts a token is sent to, from the (text) config; None when the model names none."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for src in (cfg, getattr(cfg, "ffn_config", None)):  # dbrx keeps it in ffn_config.moe_top_k
        for field in _TOP_K_FIELDS:
            k = getattr(src, field, None)
            if isinstance(k, (list, tuple)) and k:  # per-layer top-k (hunyuan): the largest is an upper bound
                k = max(k)
            if isinstance(k, int) and k > 0:
                return k
    return None


def _decode_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a decode step runs: the decoder stack and the LM head. A multimodal model's vision/audio
    towers and projectors run only on their inputs during prefill, never for a decoded token."""
    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except Exception:  # not a transformers model, or one without these hooks: count all of it
        return list(model.modules())
    mods = {id(m): m for part in (decoder, head) if part is not None for m in part.modules()}
    return list(mods.values())


def linear_flops_per_token(model: torch.nn.Module) -> int:
    """Matmul FLOPs of the weights one decoded token passes through (batch 1, LM head on one position):
    2 × in × out per weight matrix it is multiplied by.

    - nn.Linear and GPT-2's Conv1D (weight stored as (in, out)): every one runs.
    - MoE routers (a module owning a 2-D `weight` (n_experts, hidden) applied with F.linear) and shared
      experts (plain Linears): always run.
    - Routed experts: only the top-k of them run for a token, so each expert block counts k experts.
      Fused layout (transformers 5): a module holding 3-D parameters (n_experts, out, in) or (n_experts, in, out),
      e.g. gate_up_proj (E, 2I, H) and down_proj (E, H, I); per-expert biases (E, out) are not matmuls.
      Older layout: a ModuleList/ModuleDict named `experts` of per-expert MLPs of nn.Linear.
    - Embeddings are lookups: not counted.
    """
    from transformers.pytorch_utils import Conv1D

    modules = _decode_modules(model)
    k = _experts_per_token(model)
    # Older layout: the Linears of a per-expert list run for k of its len(list) experts (all experts of a
    # block have the same shape, so summing all of them and scaling by k/E gives k experts' worth).
    scale: dict[int, float] = {}
    for m in modules:
        for name, child in m.named_children():
            if (isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) and name.endswith("experts")
                    and "shared" not in name and k is not None and len(child) > 0):
                for sub in child.modules():
                    scale[id(sub)] = min(k, len(child)) / len(child)

    total = 0.0
    for m in modules:
        if isinstance(m, (torch.nn.Embedding, torch.nn.modules.conv._ConvNd)):
            continue  # a lookup; convolutions (hybrid models' short convs) are not weight matmuls of the token
        if isinstance(m, torch.nn.Linear):
            total += 2 * m.in_features * m.out_features * scale.get(id(m), 1.0)
        elif isinstance(m, Conv1D):
            total += 2 * m.weight.numel() * scale.get(id(m), 1.0)
        else:
            own = list(m.parameters(recurse=False))
            fused = [p for p in own if p.dim() == 3]
            if fused:  # fused experts: one (out, in) matrix per expert, k of the experts run
                n_experts = fused[0].shape[0]
                active = n_experts if k is None else min(k, n_experts)
                total += active * sum(2 * p[0].numel() for p in fused)
            else:
                w = getattr(m, "weight", None)
                if isinstance(w, torch.nn.Parameter) and w.dim() == 2:  # a router: logits = F.linear(x, weight)
                    total += 2 * w.numel()
    return int(round(total))


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


# -- the conditions a timing was measured under ------------------------------------------------------
def _cpu_ticks() -> tuple[int, int, int] | None:
    """(host busy ticks over all CPUs, host total ticks, this process's ticks, all threads), or None."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of proc(5))
    except (OSError, ValueError, IndexError):
        return None
    total = sum(cpu[:8])  # user nice system idle iowait irq softirq steal
    return total - cpu[3] - cpu[4], total, own


class HostLoad:
    """How busy the host's CPUs were with *other* processes over a block: `other_cores` = average number of
    cores they kept busy (host busy time minus this process's, over the wall time). A timing on a CPU
    shared with other work is slower than the method; `loaded()` says when to distrust it."""

    def __init__(self):
        self.other_cores: float | None = None

    def __enter__(self):
        self.t0 = _cpu_ticks()
        return self

    def __exit__(self, *exc):
        t1 = _cpu_ticks()
        if self.t0 is None or t1 is None or t1[1] <= self.t0[1]:
            return
        busy, total, own = (b - a for a, b in zip(self.t0, t1))
        ncpu = os.cpu_count() or 1
        self.other_cores = round(max(0.0, (busy - own) / total) * ncpu, 3)


def loaded(other_cores: float | None, cpu_count: int | None, threads: int | None) -> bool:
    """Other processes kept more cores busy than this run left free (and at least half a core): the run's
    threads shared cores with them, so its timings are inflated."""
    if other_cores is None or not cpu_count:
        return False
    return other_cores > max(0.5, cpu_count - (threads or 1))


def run_conditions(device: torch.device) -> dict:
    """The machine a run is timed on, at its start: device name, host load average, CPU count, threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        load1 = round(os.getloadavg()[0], 2)
    except OSError:
        load1 = None
    return {"device": f"{device.type}: {name}", "load_avg_1m": load1, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
