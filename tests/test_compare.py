"""`kvbench compare`: the regression gate on a fake sweep (built by tests/test_report.make_results),
with hand-injected regressions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvbench.report import compare_main
from test_report import make_results, record, write_run


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("base"))


@pytest.fixture
def current(baseline, tmp_path):
    cur = tmp_path / "cur"
    shutil.copytree(baseline, cur)
    return cur


def edit(root: Path, run: str, fn):
    """Apply fn to the summary dict of run dir `run` (its config hash) under root."""
    p = root / "sweep" / run / "summary.json"
    s = json.loads(p.read_text())
    fn(s)
    p.write_text(json.dumps(s))


def run(baseline, current, *args):
    return compare_main([str(baseline), str(current), *args])


def test_identical_passes(baseline, current, tmp_path, capsys):
    out = tmp_path / "summary.md"
    assert run(baseline, current, "--out", str(out)) == 0
    md = out.read_text()
    assert md.startswith("### ✅ kvbench: no regression")
    assert "11 matched run(s), 0 missing, 0 new" in md
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"


def test_five_point_drop_fails(baseline, current, tmp_path):
    edit(current, "niah-snapkv-256-0", lambda s: s.update(score=s["score"] - 0.05))
    out = tmp_path / "summary.md"
    assert run(baseline, current, "--out", str(out)) == 1
    md = out.read_text()
    assert "### ❌ kvbench: 1 regression(s)" in md
    assert "tiny · niah · snapkv @ 256 q-aware: score dropped 5.00 points (> 1)" in md
    assert "| 83.3 → 78.3 (-5.0) |" in md
    # a looser tolerance lets the same drop through
    assert run(baseline, current, "--tolerance", "6") == 0


def test_subtask_drop_fails(baseline, current, capsys):
    edit(current, "longbench-streaming_llm-64-0", lambda s: s["extra"].update({"score/qasper": 0.15}))
    assert run(baseline, current) == 1
    assert "score/qasper dropped 5.00 points" in capsys.readouterr().out


def test_score_gain_passes(baseline, current):
    edit(current, "niah-snapkv-64-0", lambda s: s.update(score=s["score"] + 0.2))
    assert run(baseline, current) == 0


@pytest.mark.parametrize("field", ["kv_bytes", "decode_flops_per_token"])
def test_growth_fails(baseline, current, field, capsys):
    edit(current, "longbench-snapkv-64-0", lambda s: s.update({field: s[field] * 1.10}))
    assert run(baseline, current) == 1
    assert "grew +10.00%" in capsys.readouterr().out
    # a growth within eps passes; a shrink passes
    assert run(baseline, current, "--eps", "0.2") == 0


def test_kv_shrink_passes(baseline, current):
    edit(current, "longbench-snapkv-64-0", lambda s: s.update(kv_bytes=s["kv_bytes"] * 0.5))
    assert run(baseline, current) == 0


def test_timing_not_gated(baseline, current, capsys):
    edit(current, "niah-full-None-0", lambda s: s.update(ttft_ms=s["ttft_ms"] * 2,
                                                      decode_ms_per_token=s["decode_ms_per_token"] * 3))
    assert run(baseline, current) == 0
    out = capsys.readouterr().out
    assert "+100.0%" in out and "+200.0%" in out


def test_missing_and_new_runs(baseline, current, capsys):
    shutil.rmtree(current / "sweep" / "niah-streaming_llm-64-0")
    assert run(baseline, current) == 1
    assert "niah · streaming_llm @ 64 q-aware: missing in current results" in capsys.readouterr().out
    # a run only in current is reported, not a failure
    assert run(current, baseline) == 0
    assert "New runs (not in baseline)" in capsys.readouterr().out


def test_failed_status_fails(baseline, current, capsys):
    edit(current, "niah-snapkv-64-0", lambda s: s.update(status="failed", score=None, error_type="RuntimeError"))
    assert run(baseline, current) == 1
    out = capsys.readouterr().out
    assert "status ok → failed" in out and "score missing in current" in out


def test_fallback_match_by_config_key(baseline, current):
    # a changed config hash (e.g. a new unrelated config field) still matches by (model, task, method, budget, qa)
    for d in (current / "sweep").iterdir():
        edit(current, d.name, lambda s: s.update(config_hash="new-" + s["config_hash"]))
    assert run(baseline, current) == 0
    edit(current, "niah-snapkv-256-0", lambda s: s.update(score=s["score"] - 0.05))
    assert run(baseline, current) == 1


def test_fallback_uses_seed_when_key_is_ambiguous(tmp_path):
    base, cur = tmp_path / "b", tmp_path / "c"
    for root, hash_prefix in ((base, ""), (cur, "x")):
        for seed, score in ((0, 1.0), (1, 0.0)):
            d = write_run(root, "niah", "snapkv", 64, [record(0, "snapkv", 64, score, 1000, {"length": 1000, "depth": 0})],
                          seed=seed)
            edit(root, d.name, lambda s: s.update(config_hash=hash_prefix + s["config_hash"]))
    assert run(base, cur) == 0  # seed 0 ↔ seed 0, seed 1 ↔ seed 1; pairing across seeds would fail


def test_ci_gate(baseline, current):
    # a 0.5-point drop: inside the 1-point tolerance, but below a narrow baseline CI
    edit(current, "niah-snapkv-256-0", lambda s: s.update(score=s["score"] - 0.005))
    assert run(baseline, current) == 0
    assert run(baseline, current, "--ci") == 0  # fixture CI is score ± 0.1: the drop stays inside it
    narrow = current.parent / "narrow"
    shutil.copytree(baseline, narrow)
    edit(narrow, "niah-snapkv-256-0", lambda s: s.update(score_ci_low=s["score"] - 0.002))
    assert run(narrow, current) == 0
    assert run(narrow, current, "--ci") == 1


def test_bad_input(tmp_path, baseline, capsys):
    assert run(tmp_path / "nope", baseline) == 2
    (tmp_path / "empty").mkdir()
    assert run(baseline, tmp_path / "empty") == 2
    assert run(baseline, baseline, "--tolerance", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "does not exist" in err[0] and "no runs" in err[1] and "--tolerance" in err[2]
