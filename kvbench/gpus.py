"""One GPU per job: a job claims a free GPU of its host before CUDA starts, and holds it until its process ends.

Launchers run several jobs of a sweep at once (joblib workers, submitit processes), and none of them assigns
GPUs: left alone, every job would start on cuda:0. So each job with `device=auto` claims one GPU here:
- the pool is the GPUs this process may use (`CUDA_VISIBLE_DEVICES` if set, as SLURM or submitit set it,
  else every GPU `nvidia-smi` lists), read without initialising CUDA;
- a GPU is claimed by taking an exclusive `flock` on `<lock dir>/<GPU UUID>.lock` (UUIDs, because jobs on
  one node under SLURM's cgroups each see their own GPU as index 0). The kernel drops the lock when the
  process ends, however it ends (SIGKILL, OOM killer included): a job that dies frees its card for the next;
- the job then makes the claimed GPU its current CUDA device (found among torch's devices by UUID), so every
  default-device allocation, stream, CUDA graph and Triton launch lands on it; records name it (index, UUID,
  name). With every GPU held, a job waits for one to free.
A process keeps its GPU for its whole life (a joblib worker runs its next jobs on the same card, where its
cached model already is). The lock dir is per host (KVBENCH_GPU_LOCK_DIR, default /tmp/kvbench-gpu-locks):
two sweeps started on one host never share a card either. `gpu_lock=false` turns this off.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GPU:
    index: int   # as nvidia-smi numbers it on this host (physical order)
    uuid: str
    name: str


_CLAIMED: tuple[GPU, int] | None = None  # (the GPU this process holds, the open lock file's descriptor)


def lock_dir() -> Path:
    return Path(os.environ.get("KVBENCH_GPU_LOCK_DIR", "/tmp/kvbench-gpu-locks"))


def host_gpus() -> list[GPU]:
    """Every GPU of the host as nvidia-smi lists it ([] without nvidia-smi or a driver); no CUDA context."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",", 2)]
        if len(parts) == 3 and parts[0].isdigit():
            gpus.append(GPU(int(parts[0]), parts[1], parts[2]))
    return gpus


def visible(gpus: list[GPU], cuda_visible_devices: str | None) -> list[GPU]:
    """The GPUs a process may use: CUDA_VISIBLE_DEVICES's entries in its order (indices, UUIDs or UUID
    prefixes, as CUDA accepts them; CUDA stops at the first invalid entry), or all of them when unset."""
    if cuda_visible_devices is None:
        return list(gpus)
    out = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        match = ([g for g in gpus if str(g.index) == entry] if entry.isdigit() else
                 [g for g in gpus if entry.startswith("GPU-") and g.uuid.startswith(entry)])
        if len(match) != 1:
            break
        out.append(match[0])
    return out


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the waiting message
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def claim(pool: list[GPU], directory: Path | None = None, wait: bool = True, poll_s: float = 2.0,
          log=None) -> tuple[GPU, int] | None:
    """Lock the first free GPU of `pool` (in pool order). Returns (gpu, lock fd); None when every GPU is held
    and wait=False. With wait=True, polls until one frees (one line says it is waiting, and for which pids)."""
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(directory, 0o1777)  # shared by every user's jobs on the host, like /tmp
    except OSError:
        pass
    said = False
    while True:
        for gpu in pool:
            fd = _try_lock(directory / f"{gpu.uuid}.lock")
            if fd is not None:
                return gpu, fd
        if not wait:
            return None
        if not said and log is not None:
            held = ", ".join(f"{g.index} (pid {_holder(directory / f'{g.uuid}.lock')})" for g in pool)
            log(f"waiting for a free GPU: all {len(pool)} are held by other kvbench jobs: {held}")
            said = True
        time.sleep(poll_s)


def claim_for_job(log=None) -> GPU | None:
    """Give this process one GPU of its own (see the module docstring), once; later calls return the same one.
    None when there is no GPU to claim (no nvidia-smi, no GPU visible)."""
    global _CLAIMED
    if _CLAIMED is not None:
        return _CLAIMED[0]
    pool = visible(host_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not pool:
        return None
    got = claim(pool, log=log)
    if got is None:
        return None
    _CLAIMED = got
    return got[0]


def torch_index(gpu: GPU, pool: list[GPU] | None = None) -> int:
    """torch's index of `gpu` in this process: matched by UUID (CUDA may order devices differently from
    nvidia-smi unless CUDA_DEVICE_ORDER=PCI_BUS_ID), else its position among the visible GPUs."""
    import torch
    for i in range(torch.cuda.device_count()):
        uuid = str(getattr(torch.cuda.get_device_properties(i), "uuid", ""))
        if uuid and gpu.uuid.removeprefix("GPU-") == uuid.removeprefix("GPU-"):
            return i
    pool = pool if pool is not None else visible(host_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    return pool.index(gpu) if gpu in pool else 0


def claimed() -> GPU | None:
    return _CLAIMED[0] if _CLAIMED is not None else None
