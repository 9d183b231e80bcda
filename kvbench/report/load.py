"""Read run directories written by the engine and flatten them into one tidy pandas table.

A run directory holds `config.yaml`, `records.jsonl` and `summary.json` (see kvbench/results.py and
/work/shared/DESIGN.md). Run directories may sit at any depth below the results directory.
The table has one row per run (subtask == "all") plus one row per subtask when the summary's `extra`
holds per-subtask scores (`score/<subtask>`); subtask rows take their score from `extra` (the task's
official aggregate) and their counts, memory and latency from the run's records of that subtask.

What is read is checked: a summary.json of the wrong shape (a list, a string budget) or an unreadable
config.yaml skips its run with a one-line warning naming the file; a run whose records.jsonl does not hold
the records its summary counts (cut, emptied, damaged lines) is kept with status `incomplete` and a warning.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.results import config_problem, parse_records, records_problem, summary_problem

ALL = "all"  # the `subtask` value of a whole-run row

# Columns of the tidy table, in order.
COLUMNS = [
    "model", "task", "subtask", "subtask_kind", "method", "budget", "compression_ratio", "budget_label",
    "query_aware", "method_label",
    "score", "score_ci_low", "score_ci_high", "kv_bytes", "kv_bytes_full", "kv_ratio",
    "kv_bytes_held_max", "peak_mem_bytes", "ttft_ms", "ttft_ms_median", "ttft_reused_ms", "ttft_reused_ms_median",
    "compress_ms", "decode_ms_per_token", "decode_ms_per_token_median", "decode_flops_per_token", "loaded",
    "n", "n_failed", "status", "error_type", "error", "seed", "config_hash", "run_id", "run_dir",
]

# Per-record numeric fields averaged into subtask rows (same names as the summary's means).
RECORD_MEANS = ["kv_bytes", "kv_bytes_full", "kv_bytes_held_max", "peak_mem_bytes", "ttft_ms", "ttft_reused_ms",
                "compress_ms", "decode_ms_per_token", "decode_flops_per_token"]
# Timings also summarized by their median (`<field>_median`), beside the mean.
RECORD_MEDIANS = ["ttft_ms", "ttft_reused_ms", "decode_ms_per_token"]


@dataclass
class Run:
    """One run directory: its summary, config and (lazily read) records."""
    path: Path
    summary: dict
    config: dict
    _records: list[dict] | None = field(default=None, repr=False)
    incomplete: str | None = None  # why records.jsonl does not back the summary (None: it does)

    @property
    def records(self) -> list[dict]:
        if self._records is None:
            self._records = read_records(self.path / "records.jsonl")
        return self._records


def warn(msg: str) -> None:
    print(f"kvbench: warning: {msg}", file=sys.stderr)


def _read_records(path: Path) -> tuple[list[dict], list[int]]:
    """(records, numbers of the lines that are not records); one warning per file for those lines."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], []
    except (OSError, ValueError) as e:
        warn(f"{path}: unreadable ({e.__class__.__name__}), no records read")
        return [], []
    good, _, bad = parse_records(text)
    if bad:
        warn(f"{path}: skipped line(s) {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''} "
             f"(not records); kept the {len(good)} other record(s)")
    return good, bad


def read_records(path: Path) -> list[dict]:
    """Records of one run; a missing file gives [], and lines that are not records (a run killed mid-write
    leaves a truncated last line) are skipped with one warning, the records after them kept."""
    return _read_records(path)[0]


def _read_config(path: Path) -> tuple[dict | None, str | None]:
    """(config.yaml as a dict, None), or (None, why it cannot be read); ({}, None) when there is none."""
    import yaml
    if not path.exists():
        return {}, None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        return None, f"unreadable ({e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:200]})"
    config = {} if config is None else config
    problem = config_problem(config)
    return (None, problem) if problem else (config, None)


def load_run(path: Path) -> Run | None:
    """The run in directory `path` (holding summary.json), its records read and checked against the summary;
    None, with a one-line warning naming the file, when its summary or config cannot be used."""
    sp = path / "summary.json"
    try:
        summary = json.loads(sp.read_text())
    except (ValueError, OSError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        warn(f"{sp}: unreadable summary ({e.__class__.__name__}), skipped")
        return None
    problem = summary_problem(summary)
    if problem:
        warn(f"{sp}: {problem}; run skipped")
        return None
    config = summary.get("config") or {}
    if not config:
        config, problem = _read_config(path / "config.yaml")
        if problem:
            warn(f"{path / 'config.yaml'}: {problem}; run skipped")
            return None
    records, bad = _read_records(path / "records.jsonl")
    run = Run(path, summary, config, records)
    run.incomplete = records_problem(summary, len(records), bad)
    if run.incomplete:
        warn(f"{path}: incomplete run: {run.incomplete} (rerun it to recompute what is missing)")
    return run


def find_runs(root: Path) -> list[Run]:
    """Every run directory (one holding summary.json) at any depth below `root`, sorted by path; runs whose
    summary or config cannot be used are skipped with a warning, incomplete ones flagged (Run.incomplete)."""
    runs = [load_run(sp.parent) for sp in sorted(Path(root).rglob("summary.json"))]
    return [r for r in runs if r is not None]


def _name(summary: dict, config: dict, key: str):
    """model/task/method name: the summary's string, else the config group's `name`."""
    v = summary.get(key)
    if isinstance(v, dict):
        v = v.get("name")
    if v is None:
        c = config.get(key)
        v = c.get("name") if isinstance(c, dict) else c
    return v


def _num(v) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def budget_label(method, budget, config: dict) -> str:
    """Column label for a budget: the token budget, a compression ratio, or "full"."""
    if method == "full":
        return "full"
    if budget is not None and not (isinstance(budget, float) and math.isnan(budget)):
        return str(int(budget)) if float(budget).is_integer() else str(budget)
    ratio = config.get("compression_ratio") or (config.get("method") or {}).get("compression_ratio")
    return f"ratio {ratio}" if ratio is not None else "-"


# Aggregates a task adds to its per-subtask scores (LongBench's English/Chinese means, category means).
AGGREGATES = {"avg_en", "avg_zh", "category_avg"}


def subtask_kind(name: str) -> str:
    """What a `score/<name>` key of a summary's `extra` is: "subtask" (one of the task's datasets: LongBench's
    hotpotqa, RULER's niah_single_1), "marginal" (a slice of the grid: NIAH's depth=25 / length=1000, a subtask
    at one length `niah_single_1/4096`, a length bucket) or "aggregate" (a mean of subtasks: avg_en,
    cat/<category>). Only subtasks are columns of the per-subtask table; marginals get their own table and no
    column is ever averaged with the others."""
    if name == ALL:
        return ALL
    if "=" in name or "/" in name and not name.startswith("cat/"):
        return "marginal"
    if name in AGGREGATES or name.startswith("cat/"):
        return "aggregate"
    return "subtask"


def bootstrap_ci(scores, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (Efron & Tibshirani 1993) 95% CI of the mean; NaN for no samples."""
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def run_rows(run: Run) -> list[dict]:
    """The whole-run row and the subtask rows of one run."""
    s, cfg = run.summary, run.config
    method = _name(s, cfg, "method")
    budget = s.get("budget", cfg.get("budget"))
    qa = s.get("query_aware", cfg.get("query_aware"))
    base = {
        "model": _name(s, cfg, "model"), "task": _name(s, cfg, "task"), "method": method,
        "budget": _num(budget), "budget_label": budget_label(method, budget, cfg),
        "compression_ratio": _num(s.get("compression_ratio", cfg.get("compression_ratio"))),
        "query_aware": qa, "seed": cfg.get("seed"), "config_hash": s.get("config_hash"),
        "run_id": s.get("run_id"), "run_dir": str(run.path),
    }
    row = dict(base, subtask=ALL, subtask_kind=ALL, status=s.get("status", "ok"), error_type=s.get("error_type"),
               error=s.get("error"), n=_num(s.get("n")), n_failed=_num(s.get("n_failed")))
    if run.incomplete:  # the summary's numbers are not backed by the records on disk
        row.update(status="incomplete", error=run.incomplete)
    for k in ["score", "score_ci_low", "score_ci_high"] + RECORD_MEANS + [f + "_median" for f in RECORD_MEDIANS]:
        row[k] = _num(s.get(k))
    row["loaded"] = bool((s.get("conditions") or {}).get("loaded", False))
    row["kv_ratio"] = _ratio(row["kv_bytes"], row["kv_bytes_full"])
    if math.isnan(row["kv_ratio"]):
        row["kv_ratio"] = _num(s.get("kv_ratio"))
    rows = [row]

    subs = {k.split("/", 1)[1]: v for k, v in (s.get("extra") or {}).items()
            if k.startswith("score/")}
    for sub, score in subs.items():
        recs = [r for r in run.records if (r.get("meta") or {}).get("subtask") == sub]
        ok = [r for r in recs if r.get("status", "ok") == "ok"]
        sr = dict(base, subtask=sub, subtask_kind=subtask_kind(sub), status=row["status"], error_type=None, error=None,
                  score=_num(score), n=float(len(ok)) if recs else math.nan,
                  n_failed=float(len(recs) - len(ok)) if recs else math.nan)
        sr["score_ci_low"], sr["score_ci_high"] = bootstrap_ci([_num(r.get("score")) for r in ok])
        for k in RECORD_MEANS:
            vals = [_num(r.get(k)) for r in ok]
            vals = [v for v in vals if not math.isnan(v)]
            sr[k] = float(np.mean(vals)) if vals else math.nan
            if k in RECORD_MEDIANS:
                sr[k + "_median"] = float(np.median(vals)) if vals else math.nan
        sr["loaded"] = row["loaded"]
        sr["kv_ratio"] = _ratio(sr["kv_bytes"], sr["kv_bytes_full"])
        rows.append(sr)
    return rows


def method_labels(df: pd.DataFrame) -> pd.Series:
    """Method name, with the query-aware setting appended only for methods run both ways
    (SCBench's query-agnostic setting vs the usual query-aware one)."""
    both = df.groupby("method")["query_aware"].nunique(dropna=False)
    def label(r):
        if both.get(r["method"], 1) > 1 and not pd.isna(r["query_aware"]):
            return f"{r['method']} ({'q-aware' if r['query_aware'] else 'q-agnostic'})"
        return r["method"]
    return df.apply(label, axis=1) if len(df) else pd.Series([], dtype=object)


def load_table(runs: list[Run]) -> pd.DataFrame:
    """The tidy table of all runs (see module docstring), sorted by model, task, method, budget."""
    rows = [r for run in runs for r in run_rows(run)]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    df["method_label"] = method_labels(df)
    # full cache first, then methods by name; budgets numerically; the whole-run row before subtasks
    df["_full"] = df["method"] != "full"
    df["_sub"] = df["subtask"] != ALL
    df = df.sort_values(["model", "task", "_full", "method_label", "budget", "_sub", "subtask"],
                        na_position="first", kind="stable")
    return df[COLUMNS].reset_index(drop=True)


def is_niah_run(run: Run) -> bool:
    """A run whose records carry both a context length and a needle depth (NIAH / RULER niah)."""
    return any("depth" in (r.get("meta") or {}) and "length" in (r.get("meta") or {})
               for r in run.records[:50])
