"""Run directories, records, summaries, run identity, resume.

`results/<sweep>/<run-hash>/` holds
- `config.yaml`: the resolved config of the run;
- `records.jsonl`: one JSON line per (sample, query), all lines of a sample written in one `write`, flushed
  and fsynced, so a run killed at any moment loses at most the sample it was computing and resumes at the
  next unscored sample (a torn last line is dropped on load; any other line that is not a record is dropped
  with a warning, and the records after it are kept);
- `summary.json`: written atomically (temp file + fsync + rename); it counts the run's records
  (`n_records`; n + n_failed in summaries written before that field). A run is complete, and skipped unless
  `force=true`, only when its summary is valid, says it is complete, and its records all parse and are as
  many as the summary counts; otherwise it resumes and recomputes what is missing. A summary of the wrong
  shape (a list, a string budget) is ignored with a one-line warning (`summary_problem`);
- `.lock`: an advisory `flock` held while a process executes the run, so two jobs of the same config (two
  sweeps on one results dir) never append to the same records. The kernel drops the lock when the process
  dies, SIGKILL included, so there are no stale locks.

Run identity = hash of the resolved config minus the keys that only say where/how results are written,
plus SCHEMA_VERSION and the task's data version. The git commit is recorded but is not part of the
identity: unrelated commits must not invalidate finished runs.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

# Bump when a change in the code changes what a run measures or how its records/summary read (metric
# definitions, record fields, engine semantics): every run gets a new identity and is recomputed.
SCHEMA_VERSION = 2  # 2: warm-up before timing, ttft_reused_ms apart, kv_bytes_held_max, conditions

# Keys that change where/how results are written but not what is measured.
NON_IDENTITY_KEYS = {"results_dir", "sweep", "force", "logger", "progress", "hydra", "gpu_lock"}

# Record fields that depend on the machine's load, not on the config (excluded from determinism checks).
TIMING_FIELDS = ("ttft_ms", "ttft_reused_ms", "prefill_ms", "compress_ms", "question_ms", "decode_ms_per_token",
                 "decode_setup_ms", "prefill_setup_ms", "peak_mem_bytes", "other_cores", "load_avg_1m")
# Timings summarized by mean and median (a few slow samples move the mean, not the median).
MEDIAN_FIELDS = ("ttft_ms", "ttft_reused_ms", "compress_ms", "decode_ms_per_token")
# Summary fields that are timings or describe the environment of the process rather than the results.
SUMMARY_VOLATILE_FIELDS = TIMING_FIELDS + tuple(f + "_median" for f in MEDIAN_FIELDS) + (
    "started_at", "finished_at", "wall_s", "versions", "git_commit", "git_commit_date", "setup", "conditions")

# Sample failures that recur identically on every attempt; other failed samples (OOM, crashes) are retried
# when the run is resumed.
PERMANENT_ERRORS = {"ContextTooLong", "DataError"}  # a bad data row fails the same way every time


def identity(cfg: dict, data_version: str | None = None) -> dict:
    ident = {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}
    ident["_schema_version"] = SCHEMA_VERSION
    ident["_task_data_version"] = data_version
    return ident


def config_hash(cfg: dict, data_version: str | None = None) -> str:
    blob = json.dumps(identity(cfg, data_version), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask alone must set it to read it: racy under threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file, fsync and rename; the file gets the mode any new file
    gets (0o666 & ~umask), not mkstemp's 0600, so a team can read shared results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit_date() -> str | None:
    """The committer date of HEAD (ISO 8601), for `kvbench history`; None outside a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "show", "-s", "--format=%cI", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "kvbench": _kvbench_version(), "schema": SCHEMA_VERSION}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
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


def _log(msg: str) -> None:
    print(f"[kvbench] {msg}", file=sys.stderr, flush=True)


def _lines(numbers: list[int], most: int = 10) -> str:
    txt = ", ".join(map(str, numbers[:most]))
    return txt + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


# -- validation of what is read back ----------------------------------------------------------------------
_NUM, _COUNT, _STR, _BOOL, _DICT, _NAME, _SCALAR = "number", "count", "string", "bool", "object", "name", "scalar"
_SUMMARY_FIELDS = {
    **dict.fromkeys(("run_id", "config_hash", "status", "error_type", "error", "note", "started_at",
                     "finished_at", "git_commit", "git_commit_date"), _STR),
    **dict.fromkeys(("model", "task", "method"), _NAME),
    **dict.fromkeys(("budget", "compression_ratio", "score", "score_ci_low", "score_ci_high", "kv_bytes",
                     "kv_bytes_full", "kv_ratio", "kept_tokens", "context_tokens", "peak_mem_bytes", "ttft_ms",
                     "compress_ms", "decode_ms_per_token", "decode_setup_ms", "prefill_setup_ms", "decode_flops_per_token",
                     "kv_bytes_held_max", "kv_bytes_read_per_token", "ttft_reused_ms", "wall_s") + tuple(f + "_median" for f in MEDIAN_FIELDS),
                    _NUM),
    **dict.fromkeys(("n", "n_failed", "n_records"), _COUNT),
    "query_aware": _SCALAR, "run_error": _BOOL,
    **dict.fromkeys(("config", "extra", "failures", "setup", "conditions", "versions"), _DICT),
}
_CONFIG_FIELDS = {"budget": _NUM, "compression_ratio": _NUM, "query_aware": _SCALAR, "seed": _SCALAR,
                  "model": _NAME, "task": _NAME, "method": _NAME}


def _type_ok(v, kind: str) -> bool:
    if v is None:
        return True
    if kind == _NUM:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == _COUNT:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if kind == _STR:
        return isinstance(v, str)
    if kind == _BOOL:
        return isinstance(v, bool)
    if kind == _DICT:
        return isinstance(v, dict)
    if kind == _NAME:  # a name, or a config group whose name is a string
        return isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("name"), (str, type(None))))
    return isinstance(v, (str, int, float, bool))  # _SCALAR


def _fields_problem(obj, fields: dict, what: str) -> str | None:
    if not isinstance(obj, dict):
        return f"{what} is a JSON {type(obj).__name__}, not an object" if what == "summary" else \
            f"{what} is a {type(obj).__name__}, not a mapping"
    for key, kind in fields.items():
        if not _type_ok(obj.get(key), kind):
            want = {_COUNT: "a count >= 0", _NAME: "a name or a mapping with a string name",
                    _DICT: "an object", _SCALAR: "a number or a string"}.get(kind, f"a {kind}")
            return f"{key}={obj[key]!r:.60} is not {want}"
    return None


def config_problem(cfg) -> str | None:
    """Why a run config (config.yaml, or a summary's `config`) cannot be read as one; None when it can."""
    return _fields_problem(cfg, _CONFIG_FIELDS, "config")


def summary_problem(summary) -> str | None:
    """Why a parsed summary.json cannot be used (the wrong shape, a field of the wrong type); None when it can."""
    problem = _fields_problem(summary, _SUMMARY_FIELDS, "summary")
    if problem is None and summary.get("config") is not None:
        sub = config_problem(summary["config"])
        problem = None if sub is None else f"config.{sub}"
    return problem


def parse_records(text: str) -> tuple[list[dict], list[str], list[int]]:
    """The records of a records.jsonl text, their lines (newline-terminated), and the numbers of the lines
    that are not records (not JSON, not an object with a sample_id); blank lines are neither."""
    good, clean, bad = [], [], []
    for i, line in enumerate(text.splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not isinstance(r, dict) or "sample_id" not in r:
            bad.append(i)
            continue
        good.append(r)
        clean.append(line if line.endswith("\n") else line + "\n")
    return good, clean, bad


def expected_records(summary: dict) -> int | None:
    """How many records a summary counts: `n_records`, else n + n_failed (summaries written before
    n_records); None when it says neither."""
    if summary.get("n_records") is not None:
        return summary["n_records"]
    if summary.get("n") is not None and summary.get("n_failed") is not None:
        return summary["n"] + summary["n_failed"]
    return None


def records_problem(summary: dict, n_found: int, bad_lines: list[int]) -> str | None:
    """Why the records on disk do not back a summary (lines that do not parse, fewer or more records than
    it counts); None when they do."""
    if bad_lines:
        return f"records.jsonl line(s) {_lines(bad_lines)} are not records"
    want = expected_records(summary)
    if want is not None and n_found != want:
        return f"records.jsonl holds {n_found} record(s), its summary counts {want}"
    return None


class RunBusy(RuntimeError):
    """Another live process holds the run's lock."""


class RunDir:
    def __init__(self, root: Path, sweep: str, cfg: dict, data_version: str | None = None):
        self.cfg = cfg
        self.hash = config_hash(cfg, data_version)
        self.path = Path(root) / sweep / self.hash
        self.records_path = self.path / "records.jsonl"
        self.summary_path = self.path / "summary.json"
        self.job_error_path = self.path / "job_error.json"  # a launcher saw the job die (kvbench/launchers.py)
        self._lock_fd: int | None = None

    def read_summary(self, warn: bool = False) -> dict | None:
        """The run's summary; None when there is none or it cannot be used (unreadable, not JSON, the wrong
        shape: see summary_problem), then with a one-line warning naming the file if `warn`."""
        try:
            summary = json.loads(self.summary_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            problem = f"unreadable ({type(e).__name__}: {first_line(e)})"
        else:
            problem = summary_problem(summary)
            if problem is None:
                return summary
        if warn:
            _log(f"warning: {self.summary_path}: {problem}; ignored")
        return None

    def finished(self) -> bool:
        return self.summary_path.exists()

    def complete_summary(self, repair: bool = True, warn: bool = True) -> dict | None:
        """The summary of a complete run, else None (the run must resume): summary.json valid, the run did
        not crash, no retryable failure, and records.jsonl holds as many records as the summary counts, every
        line a record. `repair` only under the run's lock; `warn` logs why a run with a summary resumes."""
        if not self.finished():
            return None
        summary = self.read_summary(warn=warn)
        if summary is None:
            return None
        problem = self.config_problem()
        if problem is not None:  # resuming rewrites it (nothing is recomputed for it)
            if warn:
                _log(f"warning: {self.path / 'config.yaml'}: {problem}; rewriting it")
            return None
        records, bad = self.read_records(repair=repair, warn=warn)
        problem = records_problem(summary, len(records), bad)
        if problem is None and not needs_work(summary, records):
            return summary
        if problem is not None and warn:
            _log(f"run {self.hash} is incomplete: {problem}; resuming it")
        return None

    def config_problem(self) -> str | None:
        """Why the run's config.yaml cannot be read back as a config (None when it can, or is absent)."""
        import yaml
        try:
            cfg = yaml.safe_load((self.path / "config.yaml").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: UnicodeDecodeError
            return f"unreadable ({type(e).__name__}: {first_line(e)[:200]})"
        return config_problem({} if cfg is None else cfg)

    # -- lock ----------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the run's lock without waiting; RunBusy if another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunBusy(f"run {self.hash} is being executed by another process ({self.path})") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- files ---------------------------------------------------------------------------------------
    def start(self, force: bool = False) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if force:
            for p in (self.records_path, self.summary_path):
                p.unlink(missing_ok=True)
        import yaml
        atomic_write(self.path / "config.yaml", yaml.safe_dump(self.cfg, sort_keys=False))

    def load_records(self, repair: bool = True, warn: bool = True) -> list[dict]:
        """Records written so far. A line that is not a record is dropped, the records after it are kept:
        a torn last line (killed mid-write) silently, any other with one warning naming the file and the
        lines. With repair (only under the run's lock: another process may be appending), the file is
        rewritten without them."""
        return self.read_records(repair, warn)[0]

    def read_records(self, repair: bool = True, warn: bool = True) -> tuple[list[dict], list[int]]:
        """(records, numbers of the dropped lines); see load_records."""
        try:
            text = self.records_path.read_text()
        except FileNotFoundError:
            return [], []
        good, clean, bad = parse_records(text)
        lines = text.splitlines(keepends=True)
        only_torn = bad == [len(lines)] and not lines[-1].endswith("\n")  # a kill mid-write: expected
        if repair and clean != lines:
            atomic_write(self.records_path, "".join(clean))
        if warn and bad and not only_torn:
            _log(f"warning: {self.records_path}: dropped line(s) {_lines(bad)}, which are not records; kept the "
                 f"{len(good)} record(s) around them" + ("; file rewritten without them" if repair else ""))
        return good, bad

    def resume_records(self) -> list[dict]:
        """Records to keep when a run resumes: every record of a sample, unless one of its queries failed
        with a retryable error (then the whole sample is dropped from the file and computed again)."""
        records = self.load_records()
        retry = {r["sample_id"] for r in records
                 if r.get("status") != "ok" and r.get("error_type") not in PERMANENT_ERRORS}
        return self.drop_samples(records, retry)

    def drop_samples(self, records: list[dict], sample_ids: set) -> list[dict]:
        """`records` without those of `sample_ids`; the file is rewritten to match (under the run's lock)."""
        if not sample_ids:
            return records
        keep = [r for r in records if r["sample_id"] not in sample_ids]
        atomic_write(self.records_path, "".join(json.dumps(r, default=str) + "\n" for r in keep))
        return keep

    def append(self, records: list[dict]) -> None:
        """All records of one sample in one write, flushed and fsynced."""
        with open(self.records_path, "a") as f:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary_path, json.dumps(summary, indent=2, default=str))

    def write_job_error(self, reason: str, job_id: str, overrides: list[str]) -> None:
        """Why the job that ran this run died without a result (written by its launcher, removed when the run
        starts again)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.job_error_path, json.dumps({"error": reason, "job_id": str(job_id), "overrides": overrides}))

    def job_error(self) -> str | None:
        try:
            return json.loads(self.job_error_path.read_text()).get("error")
        except (OSError, ValueError):
            return None


def needs_work(summary: dict | None, records: list[dict]) -> bool:
    """A run is complete when its summary exists, the run itself did not crash, its records are as many as
    the summary counts, and no record failed with a retryable error (a run whose every sample is too long
    for the model is complete, and failed)."""
    if summary is None or summary.get("run_error", True):
        return True
    if expected_records(summary) not in (None, len(records)):
        return True
    return any(r.get("status") != "ok" and r.get("error_type") not in PERMANENT_ERRORS for r in records)


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


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    h = len(xs) // 2
    return xs[h] if len(xs) % 2 else (xs[h - 1] + xs[h]) / 2


def first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0][:500]


def method_label(mcfg: dict) -> str | None:
    """The method as tables name it: its name, plus `+format` for a non-plain storage format or selector
    (`snapkv+kivi`, `full+quest`), so runs of one method in two formats never share a row."""
    name = mcfg.get("name")
    for slot in ("storage", "selector"):
        fmt = mcfg.get(slot)
        fname = fmt.get("name") if isinstance(fmt, dict) else fmt
        if fname and fname != "plain":
            name = f"{name}+{fname}"
    return name


def summarize(cfg: dict, run_hash: str, records: list[dict], extra: dict, started: str, wall_s: float,
              status: str | None = None, error: BaseException | None = None, setup: dict | None = None,
              conditions: dict | None = None) -> dict:
    """One summary per run. status: ok (every record ok), partial (some failed), failed (none ok, or the run
    itself raised `error`). error_type/error: the run's error, else the first failed record's.
    Timings: `ttft_ms` over the queries that prefilled and compressed their context, `ttft_reused_ms` over
    those that reused a compressed context; mean and `_median`. `setup`: one-time costs, measured apart.
    `conditions`: device, load, CPUs; `conditions.loaded` flags a run timed on a CPU busy with other work."""
    ok = [r for r in records if r.get("status") == "ok"]
    bad = [r for r in records if r.get("status") != "ok"]
    scores = [r["score"] for r in ok if r.get("score") is not None]
    lo, hi = bootstrap_ci(scores)
    kv, kv_full = _mean(r["kv_bytes"] for r in ok), _mean(r["kv_bytes_full"] for r in ok)
    if status is None:
        status = "ok" if ok and not bad else ("failed" if not ok else "partial")
    failures: dict[str, int] = {}
    for r in bad:
        failures[r.get("error_type") or "unknown"] = failures.get(r.get("error_type") or "unknown", 0) + 1
    if error is not None:
        err_type, err = type(error).__name__, first_line(error)
    elif bad:
        err_type, err = bad[0].get("error_type"), f"sample {bad[0].get('sample_id')}: {bad[0].get('error')}"
    else:
        err_type, err = None, None
    budget = cfg.get("budget")
    note = None
    method = method_label(cfg.get("method", {}))
    if ok and method != "full" and budget is not None and all(r["context_tokens"] <= budget for r in ok):
        note = f"budget={budget} >= every context ({max(r['context_tokens'] for r in ok)} tokens): no compression"
    return {
        "run_id": run_hash, "config_hash": run_hash, "config": cfg,
        "model": cfg.get("model", {}).get("name"), "task": cfg.get("task", {}).get("name"),
        "method": method, "budget": budget,
        "query_aware": cfg.get("query_aware"), "status": status,
        "error_type": err_type, "error": err, "run_error": error is not None, "failures": failures, "note": note,
        "n": len(ok), "n_failed": len(bad), "n_records": len(records),  # n_records: what resume checks
        "score": _mean(scores), "score_ci_low": lo, "score_ci_high": hi,
        "kv_bytes": kv, "kv_bytes_full": kv_full, "kv_ratio": (kv / kv_full) if kv and kv_full else None,
        "kept_tokens": _mean(r["kept_tokens"] for r in ok), "context_tokens": _mean(r["context_tokens"] for r in ok),
        "peak_mem_bytes": _mean(r["peak_mem_bytes"] for r in ok), "ttft_ms": _mean(r["ttft_ms"] for r in ok),
        "compress_ms": _mean(r["compress_ms"] for r in ok),
        "decode_ms_per_token": _mean(r["decode_ms_per_token"] for r in ok),
        "decode_setup_ms": _mean(r.get("decode_setup_ms") for r in ok),
        "prefill_setup_ms": _mean(r.get("prefill_setup_ms") for r in ok),
        "decode_flops_per_token": _mean(r["decode_flops_per_token"] for r in ok),
        "kv_bytes_held_max": _mean(r.get("kv_bytes_held_max") for r in ok),
        "kv_bytes_read_per_token": _mean(r.get("kv_bytes_read_per_token") for r in ok),
        "ttft_reused_ms": _mean(r.get("ttft_reused_ms") for r in ok),
        **{f + "_median": _median(r.get(f) for r in ok) for f in MEDIAN_FIELDS},
        "setup": setup or {}, "conditions": _conditions(conditions, ok),
        "extra": extra, "versions": versions(), "git_commit": git_commit(),
        "git_commit_date": git_commit_date(), "started_at": started, "finished_at": now(), "wall_s": wall_s,
    }


def _conditions(conditions: dict | None, ok: list[dict]) -> dict:
    from kvbench.metrics import loaded
    c = dict(conditions or {})
    others = [r.get("other_cores") for r in ok if r.get("other_cores") is not None]
    c["other_cores"] = _mean(others)          # cores other processes kept busy, mean over the queries
    c["other_cores_max"] = max(others, default=None)
    c["loaded"] = bool(others) and loaded(max(others), c.get("cpu_count"), c.get("torch_threads"))
    return c


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
