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


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The final table's rows, each {column header: cell}."""
    lines = [l for l in stdout.splitlines() if l.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in l.strip("|").split("|")))) for l in lines[1:]]


def assert_four_ok(out, results):
    assert out.returncode == 0, out.stderr[-3000:]
    found = runs(results)
    assert set(found) == {(m, b, (50,)) for m in ("snapkv", "streaming_llm") for b in (32, 64)}
    for d in found.values():
        s = summary(d)
        assert s["status"] == "ok" and s["n"] == 1 and s["config_hash"] == d.name
        assert [r["sample_id"] for r in records(d)] == ["niah-300-50"]
    rows = table_rows(out.stdout)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"} and "why" not in rows[0]


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
    assert sorted(r["status"] for r in rows) == ["failed", "failed", "ok", "ok"]
    why = sorted(r["why"] for r in rows if r["status"] == "failed")  # the table says why each failed
    assert why[0].startswith("OutOfMemoryError: sample niah-300-50: CUDA out of memory"), why
    assert why[1].startswith("RuntimeError: sample niah-300-0: injected crash"), why
    assert all(r["why"] == "" for r in rows if r["status"] == "ok")
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


# -- issue 11: CLI conventions ------------------------------------------------------------------------------
def test_help_lists_every_command_and_version_prints():
    from kvbench.cli import COMMANDS
    out = subprocess.run([KVBENCH, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    for cmd in COMMANDS:
        assert sum(ln.split()[:1] == [cmd] for ln in lines) == 1, (cmd, out.stdout)
    from importlib.metadata import version
    out = subprocess.run([KVBENCH, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"kvbench {version('kvbench')}"


def test_list_reads_the_sources_without_torch_and_matches_the_classes():
    """`kvbench list` reads paper/family/description from the sources (fast, no torch import); what it reads
    must be exactly what the imported classes say."""
    code = ("import sys, io, contextlib\nfrom kvbench.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    rc = main(['list'])\n"
            "assert rc == 0, rc\nprint('torch' in sys.modules, 'transformers' in sys.modules)\nprint(buf.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, listing = out.stdout.split("\n", 1)
    assert first == "False False", first
    from kvbench.catalog import static_registry
    from kvbench.method import load_all_methods
    from kvbench.store import STORAGES
    from kvbench.task import load_all_tasks
    reg = static_registry()
    for kind, classes in (("method", load_all_methods()), ("task", load_all_tasks()),
                          ("storage", {k: v for k, v in STORAGES.items() if k != "plain"})):
        assert set(reg[kind]) == set(classes), kind
        for name, cls in classes.items():
            for attr in ("paper", "family", "description"):
                assert reg[kind][name][attr] == (getattr(cls, attr, "") or ""), (kind, name, attr)
    rows = [ln for ln in listing.splitlines() if ln.startswith("  snapkv ") or ln.startswith("  h2o ")]
    assert len(rows) == 2 and rows[0].index("eviction") == rows[1].index("eviction")  # aligned columns
    assert "compression_ratio=R" in listing


def test_progress_lines_and_result_dir_when_not_a_terminal(tmp_path):
    results = tmp_path / "results"
    out = kvbench(results, "method=snapkv", "budget=64")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "snapkv@64: 1/2 samples" in out.stderr and "snapkv@64: 2/2 samples" in out.stderr, out.stderr
    (run,) = [p for p in (results / "default").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert "ok, score" in out.stderr and f"-> {run}" in out.stderr
    assert f"kvbench report {results / 'default'}" in out.stdout
    assert "\r" not in out.stderr  # no bar redrawn into the log


def test_profiles_found_from_anywhere(tmp_path, monkeypatch, capsys):
    """Outside the checkout (no ./results/profiles) a profile is written to the user cache and found again from
    any other directory; inside a directory with results/profiles (the old place) it is written there and
    still found from elsewhere. Computing one says so, with its destination."""
    from kvbench.methods import _profiles
    from kvbench.models import load_model
    for v in _profiles.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    lm = load_model(name="synthetic", shape="tiny", device="cpu")
    calls = []

    def compute(lm):
        calls.append(1)
        return {"x": 1}, 10

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    entry, cached, path = _profiles.get_or_create(lm, "duoattention", {"k": 1}, compute, "results/profiles")
    assert not cached and calls == [1] and path.is_relative_to(tmp_path / "cache" / "profiles")
    err = capsys.readouterr().err
    assert "profiling now" in err and str(path) in err and "profile computed" in err
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    entry2, cached, path2 = _profiles.get_or_create(lm, "duoattention", {"k": 1}, compute, "results/profiles")
    assert cached and calls == [1] and path2 == path and entry2["data"] == {"x": 1}
    assert f"using the profile of {lm.name} in {path}" in capsys.readouterr().err
    module = _profiles.attention_modules(lm.model)[0]
    assert _profiles.lookup_from_module("duoattention", {"k": 1}, module, "results/profiles")["data"] == {"x": 1}
    # the old place: ./results/profiles where it exists is written and read first
    old = tmp_path / "checkout"
    (old / "results" / "profiles").mkdir(parents=True)
    monkeypatch.chdir(old)
    _, cached, path3 = _profiles.get_or_create(lm, "duoattention", {"k": 2}, compute, "results/profiles")
    assert not cached and path3.resolve().is_relative_to((old / "results" / "profiles").resolve())
    monkeypatch.chdir(other)
    assert _profiles.lookup_from_module("duoattention", {"k": 1}, module, "results/profiles")["data"] == {"x": 1}
    with pytest.raises(ValueError, match="cache/profiles"):  # k=2 lives in ./results/profiles of the checkout dir only
        _profiles.lookup_from_module("duoattention", {"k": 2}, module, "results/profiles")
    # an explicit directory is the only one used
    monkeypatch.setenv("KVBENCH_PROFILES", str(tmp_path / "explicit"))
    with pytest.raises(ValueError, match="explicit"):
        _profiles.lookup_from_module("duoattention", {"k": 1}, module, "results/profiles")


def test_gguf_dequantization_bar_stays_out_of_logs(capsys):
    """transformers' GGUF reader draws its bar unconditionally; while kvbench dequantizes, a bar is drawn on a
    terminal only (here stderr is captured, as in a log)."""
    import transformers.modeling_gguf_pytorch_utils as g
    from kvbench.models import _tty_only_bars
    list(g.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" in capsys.readouterr().err  # the control: transformers' own bar, in the log
    with _tty_only_bars():
        list(g.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing" not in capsys.readouterr().err
    assert not isinstance(g.tqdm, __import__("functools").partial)  # restored afterwards
