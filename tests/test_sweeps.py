"""Sweeps end to end through `kvbench run -m` (subprocesses, as a user runs them): the out-of-process
launchers, failures that don't stop a sweep, a sweep killed with SIGKILL and restarted, determinism.

Every run is `model=synthetic model.shape=tiny` on a 300-token NIAH grid with 4 new tokens (a few seconds).
Parallel launchers use at most 2 processes at a time (the test machine has 2 cores).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.results import SUMMARY_VOLATILE_FIELDS, TIMING_FIELDS

KVBENCH = str(Path(sys.executable).with_name("kvbench")) if Path(sys.executable).with_name("kvbench").exists() \
    else shutil.which("kvbench")
TINY = ["model=synthetic", "model.shape=tiny", "task=niah", "task.lengths=[300]", "task.max_new_tokens=4"]

# Fields that measure the machine's speed, not the config (records), plus the summary's clock/env fields.
RECORD_TIMING = set(TIMING_FIELDS)
SUMMARY_VOLATILE = set(SUMMARY_VOLATILE_FIELDS)


def kvbench(results, *args, fault=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KVBENCH_FAULT", None)
    if fault:
        env["KVBENCH_FAULT"] = fault
    return subprocess.run([KVBENCH, "run", "-m", *TINY, f"results_dir={results}", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=results.parent)


def runs(results, sweep="default"):
    """{(method, budget, depths): run dir} for every run directory of the sweep."""
    out = {}
    for d in sorted((results / sweep).iterdir()):
        if d.name.startswith("."):
            continue
        cfg = json.loads((d / "summary.json").read_text())["config"] if (d / "summary.json").exists() else None
        if cfg is None:
            import yaml
            cfg = yaml.safe_load((d / "config.yaml").read_text())
        out[(cfg["method"]["name"], cfg["budget"], tuple(cfg["task"]["depths"]))] = d
    return out


def records(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines()]


def summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def stable_summary(s: dict) -> dict:
    s = {k: v for k, v in s.items() if k not in SUMMARY_VOLATILE}
    s["config"] = {k: v for k, v in s["config"].items() if k not in ("results_dir", "sweep")}
    return s


def stable_records(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in RECORD_TIMING} for r in recs]


def table_rows(stdout: str) -> list[list[str]]:
    lines = [l for l in stdout.splitlines() if l.startswith("| ")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[1:]]


def assert_four_ok(out, results):
    assert out.returncode == 0, out.stderr[-3000:]
    found = runs(results)
    assert set(found) == {(m, b, (50,)) for m in ("snapkv", "streaming_llm") for b in (32, 64)}
    for d in found.values():
        s = summary(d)
        assert s["status"] == "ok" and s["n"] == 1 and s["config_hash"] == d.name
        assert [r["sample_id"] for r in records(d)] == ["niah-300-50"]
    rows = table_rows(out.stdout)
    assert len(rows) == 4 and {r[-1] for r in rows} == {"ok"}


# -- launchers ------------------------------------------------------------------------------------------
def test_submitit_local_sweep_of_4_jobs(tmp_path):
    results = tmp_path / "res"
    out = kvbench(results, "hydra/launcher=submitit_local", "hydra.sweeper.max_batch_size=2",
                  "method=snapkv,streaming_llm", "budget=32,64", "task.depths=[50]")
    assert_four_ok(out, results)
    assert list((results / "default" / ".hydra" / ".submitit").iterdir())  # the jobs really went through submitit


def test_joblib_sweep_of_4_jobs(tmp_path):
    results = tmp_path / "res"
    out = kvbench(results, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  "method=snapkv,streaming_llm", "budget=32,64", "task.depths=[50]")
    assert_four_ok(out, results)


# -- failures -------------------------------------------------------------------------------------------
def test_failing_jobs_do_not_stop_the_sweep_and_are_retried(tmp_path):
    """An injected CUDA OOM in one job and a crash in another: the other jobs finish, both failures are
    recorded (status, error type, message), the exit code and the table say 2 failed; the same command
    without the faults recomputes only the failed runs."""
    results = tmp_path / "res"
    args = ["method=snapkv,streaming_llm", "budget=32", "task.depths=[0],[50]"]
    out = kvbench(results, *args,
                  fault="oom:niah-300-50:method.name=snapkv;error:niah-300-0:method.name=streaming_llm")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "4 runs: 2 failed" in out.stderr
    found = runs(results)
    assert len(found) == 4
    oom, crash = found[("snapkv", 32, (50,))], found[("streaming_llm", 32, (0,))]
    for d, etype, words in ((oom, "OutOfMemoryError", "CUDA out of memory"), (crash, "RuntimeError", "injected crash")):
        s = summary(d)
        assert s["status"] == "failed" and s["n"] == 0 and s["n_failed"] == 1 and s["failures"] == {etype: 1}
        assert s["error_type"] == etype and words in s["error"]
        (r,) = records(d)
        assert r["status"] == "failed" and r["error_type"] == etype and words in r["error"]
    good = [d for d in found.values() if d not in (oom, crash)]
    for d in good:
        assert summary(d)["status"] == "ok" and records(d)[0]["status"] == "ok"
    rows = table_rows(out.stdout)
    assert sorted(r[-1] for r in rows) == ["failed", "failed", "ok", "ok"]
    before = {d: (d / "summary.json").read_bytes() for d in good}

    again = kvbench(results, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(summary(d)["status"] == "ok" for d in found.values())
    assert all((d / "summary.json").read_bytes() == before[d] for d in good)  # finished runs were skipped
    for d in (oom, crash):
        (r,) = records(d)  # the failed record was replaced, not duplicated
        assert r["status"] == "ok"


# -- SIGKILL and resume; determinism --------------------------------------------------------------------
SWEEP = ["method=snapkv,streaming_llm", "budget=32", "task.depths=[0,50,100]"]  # 2 runs × 3 samples


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The sweep, uninterrupted."""
    results = tmp_path_factory.mktemp("ref") / "res"
    out = kvbench(results, *SWEEP)
    assert out.returncode == 0, out.stderr[-3000:]
    return runs(results)


def test_sigkill_mid_run_then_restart_equals_uninterrupted(tmp_path, reference):
    results = tmp_path / "res"
    # SIGKILL the sweep process as the second run reaches its second sample (the first run is complete).
    out = kvbench(results, *SWEEP, fault="kill:niah-300-50:method.name=streaming_llm")
    assert out.returncode == -signal.SIGKILL
    found = runs(results)
    done, cut = found[("snapkv", 32, (0, 50, 100))], found[("streaming_llm", 32, (0, 50, 100))]
    assert (done / "summary.json").exists() and not (cut / "summary.json").exists()
    assert [r["sample_id"] for r in records(cut)] == ["niah-300-0"]
    done_summary = (done / "summary.json").read_bytes()
    cut_first_line = (cut / "records.jsonl").read_text().splitlines()[0]

    out = kvbench(results, *SWEEP)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resume run" in out.stderr
    # nothing finished was recomputed: the complete run's summary and the recorded sample (its timings
    # included) are byte for byte what they were before the kill
    assert (done / "summary.json").read_bytes() == done_summary
    assert (cut / "records.jsonl").read_text().splitlines()[0] == cut_first_line
    for key, d in runs(results).items():
        recs = records(d)
        ids = [(r["sample_id"], r["query_idx"]) for r in recs]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 3  # every record exactly once
        assert stable_records(recs) == stable_records(records(reference[key]))
        assert stable_summary(summary(d)) == stable_summary(summary(reference[key]))


def test_same_config_twice_gives_identical_records(tmp_path, reference):
    results = tmp_path / "res"
    out = kvbench(results, *SWEEP)
    assert out.returncode == 0, out.stderr[-3000:]
    again = runs(results)
    assert set(again) == set(reference)
    for key, d in again.items():
        a, b = records(d), records(reference[key])
        assert len(a) == 3 and stable_records(a) == stable_records(b)
        for r in a:  # the compared fields are real measurements, and the timings were really excluded
            assert r["status"] == "ok" and isinstance(r["score"], float) and isinstance(r["prediction"], str)
            assert 0 < r["kept_tokens"] < r["context_tokens"] and r["new_tokens"] >= 1
            assert isinstance(r["ttft_ms"], float) and r["ttft_ms"] > 0
        assert stable_summary(summary(d)) == stable_summary(summary(reference[key]))
