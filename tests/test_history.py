"""`kvbench history`: three fake commits (the sweep of test_report.make_results), the middle one with a
regression; the page marks exactly that commit, orders commits by their commit date (not by the order the
dirs are given), and its CSV holds the hand-known values."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kvbench.report.history import history_main
from test_report import make_results

COMMITS = [("a" * 40, "2026-11-01T10:00:00+00:00"), ("b" * 40, "2026-11-02T10:00:00+00:00"),
           ("c" * 40, "2026-11-03T10:00:00+00:00")]
REGRESSED = "niah-snapkv-256-0"  # at commit b: score 5/6 -> 5/6 - 0.05, kv_bytes unchanged


def fake_commit(root: Path, sha: str, date: str, regress: bool, device: str = "cpu") -> Path:
    make_results(root)
    for sp in root.rglob("summary.json"):
        s = json.loads(sp.read_text())
        s.update(git_commit=sha, git_commit_date=date, conditions={"device": device, "loaded": False})
        if regress and sp.parent.name == REGRESSED:
            s["score"] -= 0.05
        sp.write_text(json.dumps(s))
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hist")
    # given out of order on purpose: c, a, b
    return [fake_commit(base / sha[:1], sha, date, sha[0] == "b") for sha, date in (COMMITS[2], COMMITS[0], COMMITS[1])]


def test_history_marks_the_regression(dirs, tmp_path, capsys):
    out = tmp_path / "hist"
    assert history_main([*map(str, dirs), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split()[0] for l in lines[:3]] == ["aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"]  # by commit date
    assert "FAILED" not in lines[0] and "FAILED" in lines[1] and "FAILED" not in lines[2]
    assert "tiny · niah · snapkv @ 256 q-aware: score dropped 5.00 points (> 1)" in lines[1]
    assert lines[3].startswith("3 commits, 1 where compare failed")
    html = (out / "index.html").read_text()
    assert "3 commits, 1 where compare failed" in html
    assert html.count('<b class="err">FAILED</b>') == 1 and html.count("<td>ok</td>") == 2
    assert "http://" not in html and "https://" not in html and "<script" not in html
    # score, KV MiB, decode GFLOPs (gated) + TTFT, decode ms/token (per device)
    assert html.count("data:image/png;base64,") == 5
    rows = list(csv.DictReader((out / "history.csv").open()))
    score = {r["commit"][0]: float(r["value"]) for r in rows
             if r["metric"] == "score" and r["run"] == "tiny · niah · snapkv @ 256 q-aware"}
    assert score == pytest.approx({"a": 500 / 6, "b": 500 / 6 - 5, "c": 500 / 6}, abs=1e-3)
    kv = {r["commit"][0]: float(r["value"]) for r in rows
          if r["metric"] == "kv_bytes" and r["run"] == "tiny · niah · snapkv @ 256 q-aware"}
    assert kv == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.5})  # 256 tokens × 2048 B = 0.5 MiB
    assert {r["run"] for r in rows if r["metric"] == "ttft_ms"} >= {"tiny · niah · snapkv @ 256 q-aware [cpu]"}
    failed = {r["commit"][0] for r in rows if r["compare_failed"] == "True"}
    assert failed == {"b"}


def test_history_against_baseline(dirs, tmp_path, capsys):
    """Gated against a fixed baseline (commit a), the regression stays until it is fixed: b and c identical
    to b would both fail; here c is back to a's numbers, so only b fails."""
    a = next(d for d in dirs if d.name == "a")
    assert history_main([*map(str, dirs), "--out", str(tmp_path / "h"), "--baseline", str(a)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert ["FAILED" in l for l in lines[:3]] == [False, True, False]


def test_history_regression_persists(tmp_path, capsys):
    """Two commits after the regression that keep it: against the previous commit only the first is marked;
    against the baseline both are."""
    ds = [fake_commit(tmp_path / "a", *COMMITS[0], False), fake_commit(tmp_path / "b", *COMMITS[1], True),
          fake_commit(tmp_path / "c", *COMMITS[2], True)]
    assert history_main([*map(str, ds), "--out", str(tmp_path / "h1")]) == 0
    assert ["FAILED" in l for l in capsys.readouterr().out.splitlines()[:3]] == [False, True, False]
    assert history_main([*map(str, ds), "--out", str(tmp_path / "h2"), "--baseline", str(ds[0])]) == 0
    assert ["FAILED" in l for l in capsys.readouterr().out.splitlines()[:3]] == [False, True, True]


def test_history_bad_input(tmp_path, capsys):
    assert history_main([str(tmp_path / "nope")]) == 2
    assert history_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is not a directory" in err[0] and "no runs" in err[1]
