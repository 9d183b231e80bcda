"""kvbench/results.py: run identity, records that survive a kill, atomic summaries, resume rules, locks.

Unit tests on hand-made records (no model); the end-to-end sweep behaviour is in tests/test_sweeps.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kvbench import results
from kvbench.results import RunBusy, RunDir, config_hash, needs_work, summarize

CFG = {"model": {"name": "synthetic", "shape": "tiny"}, "task": {"name": "niah", "lengths": [300]},
       "method": {"name": "snapkv", "window_size": 32}, "budget": 64, "compression_ratio": None, "seed": 42,
       "device": "auto", "dtype": "auto", "results_dir": "results", "sweep": "default", "force": False,
       "logger": "none"}


def rec(sample_id, score=1.0, status="ok", error_type=None, ctx=300, kept=64, qi=0):
    r = {"sample_id": sample_id, "query_idx": qi, "status": status, "error_type": error_type,
         "error": None if status == "ok" else "boom", "score": score if status == "ok" else None, "meta": {}}
    if status == "ok":
        r.update(kv_bytes=kept * 10, kv_bytes_full=ctx * 10, kept_tokens=kept, context_tokens=ctx,
                 peak_mem_bytes=1, ttft_ms=1.0, compress_ms=0.1, decode_ms_per_token=2.0, decode_flops_per_token=5)
    return r


# -- identity -------------------------------------------------------------------------------------------
def test_hash_ignores_where_results_go_but_not_what_is_measured():
    h = config_hash(CFG)
    assert len(h) == 16
    assert config_hash({**CFG, "results_dir": "/elsewhere", "sweep": "s2", "force": True, "logger": "wandb"}) == h
    assert config_hash(dict(reversed(list(CFG.items())))) == h  # key order is irrelevant
    changed = [{**CFG, "budget": 128}, {**CFG, "seed": 0}, {**CFG, "method": {**CFG["method"], "window_size": 16}},
               {**CFG, "task": {**CFG["task"], "lengths": [400]}}, {**CFG, "model": {**CFG["model"], "shape": "tiny-mha"}}]
    hashes = {config_hash(c) for c in changed}
    assert h not in hashes and len(hashes) == len(changed)


def test_hash_includes_task_data_version_and_schema_version(monkeypatch):
    h = config_hash(CFG)
    assert config_hash(CFG, data_version="2") != h
    monkeypatch.setattr(results, "SCHEMA_VERSION", results.SCHEMA_VERSION + 1)
    assert config_hash(CFG) != h


def test_run_dir_is_sweep_slash_hash(tmp_path):
    rd = RunDir(tmp_path, "sw", CFG)
    assert rd.path == tmp_path / "sw" / config_hash(CFG)


# -- records --------------------------------------------------------------------------------------------
def test_torn_last_line_is_dropped_and_file_repaired(tmp_path):
    rd = RunDir(tmp_path, "sw", CFG)
    rd.start()
    rd.append([rec("a")])
    rd.append([rec("b", qi=0), rec("b", qi=1)])
    with open(rd.records_path, "a") as f:  # a process killed in the middle of writing sample c
        f.write(json.dumps(rec("c"))[:25])
    torn = rd.records_path.read_text()
    assert len(rd.load_records(repair=False)) == 3 and rd.records_path.read_text() == torn  # read-only look
    got = rd.load_records()
    assert [(r["sample_id"], r["query_idx"]) for r in got] == [("a", 0), ("b", 0), ("b", 1)]
    lines = rd.records_path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    rd.append([rec("c")])  # appending after the repair gives well-formed lines
    assert [r["sample_id"] for r in rd.load_records()] == ["a", "b", "b", "c"]


def test_resume_retries_transient_failures_only(tmp_path):
    rd = RunDir(tmp_path, "sw", CFG)
    rd.start()
    rd.append([rec("a")])
    rd.append([rec("b", status="failed", error_type="OutOfMemoryError")])
    rd.append([rec("c", status="failed", error_type="ContextTooLong")])
    rd.append([rec("d")])
    kept = rd.resume_records()
    assert [r["sample_id"] for r in kept] == ["a", "c", "d"]
    assert [json.loads(x)["sample_id"] for x in rd.records_path.read_text().splitlines()] == ["a", "c", "d"]


def test_needs_work():
    ok = summarize(CFG, "h", [rec("a")], {}, "t", 1.0)
    assert not needs_work(ok, [rec("a")])
    assert needs_work(None, [])
    crashed = summarize(CFG, "h", [], {}, "t", 1.0, status="failed", error=RuntimeError("no model"))
    assert needs_work(crashed, [])
    oom = [rec("a"), rec("b", status="failed", error_type="OutOfMemoryError")]
    assert needs_work(summarize(CFG, "h", oom, {}, "t", 1.0), oom)
    too_long = [rec("a", status="failed", error_type="ContextTooLong")]
    s = summarize(CFG, "h", too_long, {}, "t", 1.0)
    assert s["status"] == "failed" and not needs_work(s, too_long)  # recomputing cannot change it


# -- summaries ------------------------------------------------------------------------------------------
def test_summary_statuses_and_means():
    recs = [rec("a", 1.0), rec("b", 0.0), rec("c", 0.5)]
    s = summarize(CFG, "h", recs, {}, "t", 1.0)
    assert s["status"] == "ok" and s["n"] == 3 and s["n_failed"] == 0 and s["score"] == pytest.approx(0.5)
    assert s["kv_ratio"] == pytest.approx(64 / 300) and s["failures"] == {} and s["error_type"] is None
    part = summarize(CFG, "h", recs + [rec("d", status="failed", error_type="OutOfMemoryError")], {}, "t", 1.0)
    assert part["status"] == "partial" and part["n_failed"] == 1 and part["score"] == pytest.approx(0.5)
    assert part["failures"] == {"OutOfMemoryError": 1}
    assert part["error_type"] == "OutOfMemoryError" and part["error"].startswith("sample d:")
    failed = summarize(CFG, "h", [rec("d", status="failed", error_type="RuntimeError")], {}, "t", 1.0)
    assert failed["status"] == "failed" and failed["score"] is None and not failed["run_error"]
    crash = summarize(CFG, "h", [], {}, "t", 1.0, status="failed", error=ValueError("bad\nsecond line"))
    assert crash["error_type"] == "ValueError" and crash["error"] == "bad" and crash["run_error"]


def test_budget_above_context_is_reported_as_no_compression():
    s = summarize({**CFG, "budget": 4096}, "h", [rec("a", ctx=300, kept=300), rec("b", ctx=500, kept=500)],
                  {}, "t", 1.0)
    assert s["note"] == "budget=4096 >= every context (500 tokens): no compression"
    assert summarize(CFG, "h", [rec("a", ctx=300)], {}, "t", 1.0)["note"] is None  # 64 < 300
    full = {**CFG, "method": {"name": "full"}, "budget": None}
    assert summarize(full, "h", [rec("a")], {}, "t", 1.0)["note"] is None


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean():
    vals = [0.0, 1.0] * 10
    lo, hi = results.bootstrap_ci(vals)
    assert (lo, hi) == results.bootstrap_ci(vals) and lo < 0.5 < hi
    assert results.bootstrap_ci([0.7]) == (0.7, 0.7)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "d" / "summary.json"
    results.atomic_write(p, "one")
    results.atomic_write(p, "two")
    assert p.read_text() == "two" and os.listdir(p.parent) == ["summary.json"]


# -- locks ----------------------------------------------------------------------------------------------
def test_lock_excludes_a_second_executor(tmp_path):
    a, b = RunDir(tmp_path, "sw", CFG), RunDir(tmp_path, "sw", CFG)
    a.lock()
    with pytest.raises(RunBusy):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()


def test_lock_of_a_killed_process_is_released(tmp_path):
    """A SIGKILLed job leaves no stale lock: the kernel drops flock locks with the process."""
    code = (f"import sys, time; sys.path[:0] = {sys.path!r}\n"
            f"from kvbench.results import RunDir\n"
            f"rd = RunDir({str(tmp_path)!r}, 'sw', {CFG!r}); rd.lock(); print('locked', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        rd = RunDir(tmp_path, "sw", CFG)
        with pytest.raises(RunBusy):
            rd.lock()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        deadline = time.time() + 5
        while True:
            try:
                rd.lock()
                break
            except RunBusy:
                assert time.time() < deadline
                time.sleep(0.05)
        rd.unlock()
    finally:
        p.kill()
        p.wait()
