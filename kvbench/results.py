"""Run directories, records, summaries, config hash, resume.

`results/<sweep>/<config-hash>/` holds `config.yaml`, `records.jsonl` (appended and flushed per sample, so
a killed run resumes at the next unscored sample) and `summary.json` (written atomically; its presence
means the run is finished and a rerun is skipped unless forced).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

# Keys that change where/how results are written but not what is measured.
NON_IDENTITY_KEYS = {"results_dir", "sweep", "force", "logger", "progress", "hydra"}

TIMING_FIELDS = ("ttft_ms", "prefill_ms", "compress_ms", "decode_ms_per_token", "peak_mem_bytes")


def config_hash(cfg: dict) -> str:
    ident = {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "kvbench": _kvbench_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def _kvbench_version() -> str:
    try:
        from importlib.metadata import version
        return version("kvbench")
    except Exception:
        return "unknown"


class RunDir:
    def __init__(self, root: Path, sweep: str, cfg: dict):
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.path = Path(root) / sweep / self.hash
        self.records_path = self.path / "records.jsonl"
        self.summary_path = self.path / "summary.json"

    def finished(self) -> bool:
        return self.summary_path.exists()

    def start(self, force: bool = False) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if force:
            for p in (self.records_path, self.summary_path):
                if p.exists():
                    p.unlink()
        import yaml
        atomic_write(self.path / "config.yaml", yaml.safe_dump(self.cfg, sort_keys=False))

    def load_records(self) -> list[dict]:
        """Records written so far; a torn last line (killed mid-write) is dropped and the file repaired."""
        if not self.records_path.exists():
            return []
        good, lines = [], self.records_path.read_text().splitlines(keepends=True)
        clean = []
        for line in lines:
            try:
                good.append(json.loads(line))
                clean.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                break
        if len(clean) != len(lines) or (lines and not lines[-1].endswith("\n")):
            atomic_write(self.records_path, "".join(clean))
        return good

    def append(self, records: list[dict]) -> None:
        """All records of one sample in one write, flushed and fsynced."""
        with open(self.records_path, "a") as f:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary_path, json.dumps(summary, indent=2, default=str))


def bootstrap_ci(values: list[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    if not values:
        return (float("nan"), float("nan"))
    if len(values) == 1:
        return (values[0], values[0])
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int(alpha / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]
    return (lo, hi)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(cfg: dict, run_hash: str, records: list[dict], extra: dict, started: str, wall_s: float,
              status: str | None = None, error: BaseException | None = None) -> dict:
    ok = [r for r in records if r.get("status") == "ok"]
    scores = [r["score"] for r in ok if r.get("score") is not None]
    lo, hi = bootstrap_ci(scores)
    kv, kv_full = _mean(r["kv_bytes"] for r in ok), _mean(r["kv_bytes_full"] for r in ok)
    n_failed = len(records) - len(ok)
    if status is None:
        status = "ok" if ok and n_failed == 0 else ("failed" if not ok else "partial")
    return {
        "run_id": run_hash, "config_hash": run_hash, "config": cfg,
        "model": cfg.get("model", {}).get("name"), "task": cfg.get("task", {}).get("name"),
        "method": cfg.get("method", {}).get("name"), "budget": cfg.get("budget"),
        "query_aware": cfg.get("query_aware"), "status": status,
        "error_type": type(error).__name__ if error else None, "error": str(error).splitlines()[0] if error else None,
        "n": len(ok), "n_failed": n_failed, "score": _mean(scores), "score_ci_low": lo, "score_ci_high": hi,
        "kv_bytes": kv, "kv_bytes_full": kv_full, "kv_ratio": (kv / kv_full) if kv and kv_full else None,
        "kept_tokens": _mean(r["kept_tokens"] for r in ok), "context_tokens": _mean(r["context_tokens"] for r in ok),
        "peak_mem_bytes": _mean(r["peak_mem_bytes"] for r in ok), "ttft_ms": _mean(r["ttft_ms"] for r in ok),
        "compress_ms": _mean(r["compress_ms"] for r in ok),
        "decode_ms_per_token": _mean(r["decode_ms_per_token"] for r in ok),
        "decode_flops_per_token": _mean(r["decode_flops_per_token"] for r in ok),
        "extra": extra, "versions": versions(), "git_commit": git_commit(),
        "started_at": started, "finished_at": now(), "wall_s": wall_s,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
