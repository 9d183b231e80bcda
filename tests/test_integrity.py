"""Issue 12, "never lose or misreport a result": a finished run is checked against its records (1), what is
read back is validated (6), shared result files respect the umask (8), a bad line in the middle of
records.jsonl loses nothing after it (10).

End-to-end runs use kvbench.runner.execute on the synthetic tiny model and a 3-sample NIAH grid (seconds);
report/compare run on hand-made run dirs (tests/test_report.write_run)."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from kvbench import runner
from kvbench.report import compare_main
from kvbench.report.load import find_runs, load_table
from kvbench.results import TIMING_FIELDS, RunDir, atomic_write
from test_report import make_results, record, write_run

DEPTHS = [10, 50, 90]


def run_cfg(tmp_path: Path) -> dict:
    return {"model": {"name": "synthetic", "shape": "tiny"}, "device": "cpu", "dtype": "float32",
            "method": {"name": "streaming_llm", "n_sink": 4}, "budget": 64, "query_aware": False, "seed": 0,
            "task": {"name": "niah", "lengths": [300], "depths": DEPTHS, "max_new_tokens": 4},
            "results_dir": str(tmp_path / "results"), "sweep": "integrity", "warmup": False}


@pytest.fixture
def computed(monkeypatch):
    """The sample ids the engine computes (run_sample calls), in order."""
    seen: list[str] = []
    real = runner.Engine.run_sample

    def spy(self, sample):
        seen.append(sample.id)
        return real(self, sample)
    monkeypatch.setattr(runner.Engine, "run_sample", spy)
    return seen


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run: (its directory, its summary, its records.jsonl text), computed once; tests copy it."""
    tmp = tmp_path_factory.mktemp("finished")
    summary = runner.execute(run_cfg(tmp))
    d = Path(summary["_dir"])
    assert summary["status"] == "ok" and summary["n"] == len(DEPTHS)
    return d, summary, (d / "records.jsonl").read_text()


@pytest.fixture
def run_copy(finished, tmp_path):
    """A private copy of the finished run (same results layout, so execute finds it): (cfg, run dir)."""
    d, _, _ = finished
    cfg = run_cfg(tmp_path)
    dst = Path(cfg["results_dir"]) / cfg["sweep"] / d.name
    shutil.copytree(d, dst)
    return cfg, dst


def lines(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]


def untimed(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in TIMING_FIELDS}


# -- 1: a finished run is checked against its records ---------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 1, "1.5"], ids=["emptied", "one-record-left", "cut-mid-line"])
def test_lost_records_of_a_finished_run_are_recomputed(finished, run_copy, computed, keep, capsys):
    _, summary0, text0 = finished
    cfg, d = run_copy
    full = text0.splitlines(keepends=True)
    kept = full[:int(float(keep))]
    cut = "".join(kept) + (full[1][: len(full[1]) // 2] if keep == "1.5" else "")
    (d / "records.jsonl").write_text(cut)  # summary.json stays

    s = runner.execute(cfg)
    err = capsys.readouterr().err
    assert "skip finished run" not in err and "incomplete" in err  # old code: skipped, nothing recomputed
    missing = [json.loads(x)["sample_id"] for x in full[len(kept):]]
    assert computed == missing  # exactly the lost samples, each once
    recs = lines(d)
    assert [r["sample_id"] for r in recs] == [json.loads(x)["sample_id"] for x in full]
    assert recs[:len(kept)] == [json.loads(x) for x in kept]  # what survived is kept as it was
    assert [untimed(r) for r in recs] == [untimed(json.loads(x)) for x in full]  # deterministic recompute
    assert s["status"] == "ok" and s["n_records"] == len(full) and not s.get("_skipped")
    assert s["score"] == summary0["score"]

    computed.clear()  # now complete: the next run is skipped
    assert runner.execute(cfg)["_skipped"] and computed == []


def test_old_summary_without_n_records_uses_n_plus_n_failed(run_copy, computed, capsys):
    cfg, d = run_copy
    s = json.loads((d / "summary.json").read_text())
    s.pop("n_records", None)  # written before the field existed (SCHEMA_VERSION 2)
    (d / "summary.json").write_text(json.dumps(s))
    assert runner.execute(cfg)["_skipped"] and computed == []  # complete: n + n_failed == 3 records
    full = lines(d)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
    s = runner.execute(cfg)
    assert not s.get("_skipped") and computed == [full[2]["sample_id"]]
    assert s["n_records"] == 3


def test_a_sample_without_one_record_per_query_is_recomputed(run_copy, computed):
    """A sample is done only when it has one record per query: a sample cut between its queries (lines of
    one write lost) or with a stray extra record (here: NIAH samples have one query) is computed again."""
    cfg, d = run_copy
    recs = lines(d)
    second = dict(recs[1], query_idx=1)  # pretend sample 1 had two queries: its record count no longer fits
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + [second]))
    s = runner.execute(cfg)
    assert computed == [recs[1]["sample_id"]]
    assert [r["sample_id"] for r in lines(d)] == [r["sample_id"] for r in (recs[0], recs[2], recs[1])]
    assert s["n_records"] == 3 and s["status"] == "ok"


def _cut_one(root: Path, run: str) -> None:
    p = root / "sweep" / run / "records.jsonl"
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:-1]))


def test_report_and_compare_flag_incomplete_runs(tmp_path, capsys):
    base = make_results(tmp_path / "base")
    cur = tmp_path / "cur"
    shutil.copytree(base, cur)
    _cut_one(cur, "niah-snapkv-64-0")
    (cur / "sweep" / "niah-full-None-0" / "records.jsonl").write_text("")
    out = tmp_path / "summary.md"
    assert compare_main([str(base), str(cur), "--out", str(out)]) == 1  # old code: 0, "no regression"
    md = out.read_text()
    assert "❌ kvbench: 2 regression(s)" in md and "**Incomplete runs**" in md
    assert "records.jsonl holds 5 record(s), its summary counts 6" in md
    assert compare_main([str(base), str(base)]) == 0  # the untouched baseline is complete
    capsys.readouterr()

    runs = {r.path.name: r for r in find_runs(cur)}
    err = capsys.readouterr().err
    assert runs["niah-snapkv-64-0"].incomplete == "records.jsonl holds 5 record(s), its summary counts 6"
    assert runs["niah-full-None-0"].incomplete and runs["niah-snapkv-256-0"].incomplete is None
    assert err.count("incomplete run") == 2 and "niah-snapkv-64-0" in err and "niah-full-None-0" in err
    df = load_table(list(runs.values()))
    whole = df[df.subtask == "all"].set_index("run_dir")
    assert whole.loc[str(runs["niah-snapkv-64-0"].path), "status"] == "incomplete"
    assert whole.loc[str(runs["niah-snapkv-256-0"].path), "status"] == "ok"



# -- 6: what is read back is validated --------------------------------------------------------------------------
BAD_SUMMARIES = {
    "list": lambda s: [s],
    "string-budget": lambda s: {**s, "budget": "sixty-four"},
    "string-n": lambda s: {**s, "n": "3"},
    "list-config": lambda s: {**s, "config": ["x"]},
}


@pytest.mark.parametrize("kind", sorted(BAD_SUMMARIES))
def test_run_ignores_a_summary_of_the_wrong_shape(run_copy, computed, kind, capsys):
    cfg, d = run_copy
    sp = d / "summary.json"
    sp.write_text(json.dumps(BAD_SUMMARIES[kind](json.loads(sp.read_text()))))
    s = runner.execute(cfg)  # old code: AttributeError / TypeError tracebacks
    err = capsys.readouterr().err
    warned = [x for x in err.splitlines() if str(sp) in x]
    assert len(warned) == 1 and "Traceback" not in err
    assert computed == [] and s["status"] == "ok" and s["n_records"] == 3  # records kept, summary rewritten
    assert isinstance(json.loads(sp.read_text()), dict) and runner.execute(cfg)["_skipped"]


@pytest.mark.parametrize("text", ["model: [unclosed\n", "- a list\n", "budget: sixty-four\n"],
                         ids=["not-yaml", "a-list", "string-budget"])
def test_run_repairs_an_unreadable_config_yaml(run_copy, computed, text, capsys):
    cfg, d = run_copy
    y = d / "config.yaml"
    y.write_text(text)
    s = runner.execute(cfg)  # resumes to rewrite it: nothing to recompute
    err = capsys.readouterr().err
    assert len([x for x in err.splitlines() if str(y) in x]) == 1 and "Traceback" not in err
    assert computed == [] and s["status"] == "ok" and s["n_records"] == 3
    assert yaml.safe_load(y.read_text())["budget"] == 64 and runner.execute(cfg)["_skipped"]


def _bad_results(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """make_results plus one broken copy of a good run per defect; returns the root and {defect: file}."""
    root = make_results(tmp_path / "res")
    good = root / "sweep" / "niah-snapkv-64-0"
    bad = {}
    for kind in ("list", "string-budget", "string-n", "list-config", "not-json", "yaml-garbage",
                 "yaml-list", "yaml-unreadable"):
        d = root / "sweep" / f"broken-{kind}"
        shutil.copytree(good, d)
        s = json.loads((d / "summary.json").read_text())
        if kind.startswith("yaml"):
            del s["config"]  # the config comes from config.yaml
            (d / "summary.json").write_text(json.dumps(s))
            y = d / "config.yaml"
            y.write_text({"yaml-garbage": "model: [unclosed\n", "yaml-list": "- a\n- b\n",
                          "yaml-unreadable": "\xff\xfe"}[kind], encoding="latin-1")
            bad[kind] = y
        else:
            (d / "summary.json").write_text("{not json" if kind == "not-json" else json.dumps(BAD_SUMMARIES[kind](s)))
            bad[kind] = d / "summary.json"
    return root, bad


def test_report_and_compare_skip_unusable_summaries_and_configs(tmp_path, capsys):
    root, bad = _bad_results(tmp_path)
    capsys.readouterr()
    runs = find_runs(root)  # old code: AttributeError / ValueError / TypeError tracebacks
    err = capsys.readouterr().err.splitlines()
    assert {r.path.name for r in runs} == {p.name for p in (root / "sweep").iterdir()} - {
        f"broken-{k}" for k in bad}
    for kind, f in bad.items():
        assert len([x for x in err if str(f) in x]) == 1, (kind, err)
    assert len(err) == len(bad)
    df = load_table(runs)
    assert len(df[df.subtask == "all"]) == len(runs)

    base = make_results(tmp_path / "base")
    assert compare_main([str(base), str(root)]) == 0  # the broken copies are skipped, the rest matches
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(str(f) in err for f in bad.values())


def test_report_main_survives_a_bad_summary(tmp_path, capsys):
    from kvbench.report import report_main
    root, bad = _bad_results(tmp_path)
    assert report_main([str(root), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0


# -- 8: shared result files follow the umask ---------------------------------------------------------------------
def test_summary_and_config_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        summary = runner.execute(run_cfg(tmp_path))
        d = Path(summary["_dir"])
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir() if not p.name.startswith(".")}
        assert modes == {"summary.json": 0o644, "config.yaml": 0o644, "records.jsonl": 0o644}  # old: 0600
        os.umask(0o077)
        atomic_write(tmp_path / "private.json", "{}")
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


# -- 10: a bad line in the middle of records.jsonl ---------------------------------------------------------------
def _rec(sid):
    return record(sid, "snapkv", 64, 1.0, 300, {})


def test_a_bad_middle_line_keeps_the_records_after_it(tmp_path, capsys):
    cfg = run_cfg(tmp_path)
    rd = RunDir(Path(cfg["results_dir"]), cfg["sweep"], cfg)
    rd.start()
    good = [_rec(i) for i in range(4)]
    body = [json.dumps(r) + "\n" for r in good]
    text = "".join(body[:1] + ["{garbage\n"] + body[1:3] + ['"not a record"\n'] + body[3:])
    rd.records_path.write_text(text)
    capsys.readouterr()

    assert rd.load_records(repair=False) == good  # old code: only the first record
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(rd.records_path) in err[0] and "2, 5" in err[0]
    assert rd.records_path.read_text() == text  # read-only look
    assert rd.load_records() == good
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "rewritten" in err[0]
    assert rd.records_path.read_text() == "".join(body)
    assert rd.load_records() == good and capsys.readouterr().err == ""  # repaired: nothing to say


def test_a_torn_last_line_is_dropped_silently(tmp_path, capsys):
    cfg = run_cfg(tmp_path)
    rd = RunDir(Path(cfg["results_dir"]), cfg["sweep"], cfg)
    rd.start()
    rd.append([_rec(0), _rec(1)])
    with open(rd.records_path, "a") as f:
        f.write(json.dumps(_rec(2))[:30])  # killed mid-write: the normal case, no warning
    assert [r["sample_id"] for r in rd.load_records()] == ["s0", "s1"] and capsys.readouterr().err == ""


def test_a_partial_run_with_a_bad_middle_line_resumes_only_what_it_lost(run_copy, computed, capsys):
    cfg, d = run_copy
    (d / "summary.json").unlink()  # a partial run, interrupted
    full = (d / "records.jsonl").read_text().splitlines(keepends=True)
    lost = json.loads(full[1])["sample_id"]
    (d / "records.jsonl").write_text(full[0] + full[1][:20] + "#\n" + full[2])  # line 2 damaged
    s = runner.execute(cfg)
    err = capsys.readouterr().err
    assert len([x for x in err.splitlines() if "dropped line(s) 2" in x]) == 1  # warned once
    assert computed == [lost]  # old code: sample 3 dropped as well, and recomputed
    assert s["n_records"] == 3 and s["status"] == "ok"


def test_report_reads_records_after_a_bad_middle_line(tmp_path, capsys):
    root = tmp_path / "res"
    recs = [_rec(i) for i in range(3)]
    d = write_run(root, "niah", "snapkv", 64, recs)
    body = (d / "records.jsonl").read_text().splitlines(keepends=True)
    (d / "records.jsonl").write_text(body[0] + "{oops\n" + "".join(body[1:]))
    capsys.readouterr()
    (run,) = find_runs(root)
    err = capsys.readouterr().err.splitlines()
    assert [r["sample_id"] for r in run.records] == ["s0", "s1", "s2"]
    assert len([x for x in err if "records.jsonl" in x and "skipped line(s) 2" in x]) == 1
    assert run.incomplete == "records.jsonl line(s) 2 are not records"
