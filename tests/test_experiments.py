"""Experiment presets (conf/experiment/*.yaml): every preset resolves and lists its jobs without running
anything; their published numbers are well-formed and cited; `kvbench report` puts ours beside the published
values (difference, inside our bootstrap CI) on a synthetic results dir with hand-computed values, and draws
the published points as hollow markers."""
from __future__ import annotations

import math

import pytest
import yaml

from kvbench import cli
from kvbench.report import report_main
from kvbench.report.experiments import (PresetError, command_lines, experiment_names, load_preset,
                                        published_rows)
from test_report import make_results

# preset -> jobs (distinct runs: the full cache is one run for every budget), counted by hand from its grids
JOBS = {
    "snapkv_longbench_mistral": 1 + 3 + 1,                       # full; snapkv × 3 budgets; h2o @ 4096
    "pyramidkv_longbench_llama3": 1 + 4 * 6,                     # full; 4 methods × 6 budgets
    "kvcache_factory_longbench_llama3_128": 1 + 2,               # full; snapkv, pyramidkv @ 128
    "kvpress_ruler4k": 2 * 1 + 2 * 6 * 4 + 2 * 2 * 4,            # 2 models × (full; 6 presses × 4 ratios; 2 q-aware × 4)
    "scbench_llama31": 2 * 1 + 2 * 2 + 2 * 1,                    # 2 modes × (full; snapkv, pyramidkv; streaming_llm)
}
# published cells attached (method rows × subtasks), counted by hand from the sources
CELLS = {"snapkv_longbench_mistral": 5 * 16, "pyramidkv_longbench_llama3": 9 * 17,
         "kvcache_factory_longbench_llama3_128": 3 * 6, "kvpress_ruler4k": 0, "scbench_llama31": 0}


def test_every_preset_is_listed():
    assert experiment_names() == sorted(JOBS)


def test_presets_dry_run(tmp_path, capsys):
    """One process for all presets (the first compose imports torch): each lists its jobs, validated
    (group names, keys, method knobs, task settings), and nothing is created in the results dir."""
    for name, n in JOBS.items():
        code = cli.main(["run", f"+experiment={name}", "--dry-run", f"results_dir={tmp_path}/res"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"{n} jobs (0 done, {n} to run); dry run: nothing was run" in out
        assert len([l for l in out.splitlines() if l.split(" ", 1)[0].isdigit() and "jobs (" not in l]) == n
        assert f"{tmp_path}/res/{load_preset(name).sweep}/" in out
    assert not (tmp_path / "res").exists()


def test_dry_run_user_overrides_win(tmp_path, capsys):
    """Overrides after the preset replace its values; overriding a group drops the preset's keys in it."""
    args = ["+experiment=kvcache_factory_longbench_llama3_128", "model=smollm2-135m", "budget=64,256",
            "task.data_dir=tests/fixtures/longbench", f"results_dir={tmp_path}"]
    lines = command_lines(load_preset("kvcache_factory_longbench_llama3_128"), args[1:])
    assert all("model.name=meta-llama/Meta-Llama-3-8B-Instruct" not in l for l in lines)
    assert all(l.count("budget=64,256") == 1 and "budget=128" not in l for l in lines[1:])
    assert cli.main(["run", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 jobs (0 done, 5 to run)" in out  # full; snapkv, pyramidkv × 2 budgets
    assert "smollm2-135m" in out and "Meta-Llama" not in out.split("\n", 1)[1]


def test_bad_preset(capsys):
    assert cli.main(["run", "+experiment=nope", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown experiment 'nope'; allowed: kvcache_factory" in err[0]
    with pytest.raises(PresetError):
        load_preset("nope")


@pytest.mark.parametrize("name", sorted(JOBS))
def test_published_values_are_cited(name):
    """Every preset names its source; one without values says why; the issue's KVCache-Factory FullKV row
    is attached exactly; subtask names are kvbench's LongBench configs."""
    from kvbench.tasks.longbench import DATASET2MAXLEN
    p = load_preset(name)
    assert p.source and any(str(v).startswith("http") or "arXiv" in str(v) for v in p.source.values())
    assert sum(len(r.scores) for r in p.published) == CELLS[name]
    if not p.published:
        assert any("No published values" in n for n in p.notes)
    for r in p.published:
        assert r.method in cli.group_options("method")
        assert r.method == "full" or r.budget is not None or r.compression_ratio is not None
        for sub, v in r.scores.items():
            assert sub in DATASET2MAXLEN or sub == "avg_en", sub
            assert 0 <= v <= 100
    if name == "kvcache_factory_longbench_llama3_128":
        full = next(r for r in p.published if r.method == "full")
        assert full.scores == {"multifieldqa_en": 47.78, "hotpotqa": 47.32, "triviaqa": 90.56, "gov_report": 30.44,
                               "samsum": 42.67, "lcc": 59.38}


# -- published vs ours, on the synthetic sweep of test_report (LB_SCORES) -------------------------------
PRESET = {
    "name": "toy", "title": "Toy table", "source": {"paper": "A paper, Table 9"},
    "settings": {"task": "longbench", "sweep": "toy"}, "grids": [{"method": ["full"]}],
    "published": [
        {"method": "full", "scores": {"qasper": 65.0, "hotpotqa": 55.0}},
        {"method": "snapkv", "budget": 64, "scores": {"hotpotqa": 40.0, "qasper": 41.0}},
        {"method": "snapkv", "budget": 256, "scores": {"avg": 50.0, "hotpotqa": 30.0}},
        {"method": "streaming_llm", "budget": 256, "scores": {"hotpotqa": 58.0}},
        {"method": "snapkv", "budget": 1024, "scores": {"hotpotqa": 50.0}},
    ]}
# (method, budget, subtask) -> (ours, diff, ci_low, ci_high, inside), by hand from LB_SCORES:
#  a subtask's two records [a, b] bootstrap to means {a, (a+b)/2, b} with p 1/4, 1/2, 1/4, so the 2.5% and
#  97.5% quantiles are min and max; "avg" falls back to the run's score (CI: score ± 0.1 in write_run)
EXPECTED = {
    ("full", None, "qasper"): (60.0, -5.0, 50.0, 70.0, True),          # [0.5, 0.7]
    ("full", None, "hotpotqa"): (50.0, -5.0, 40.0, 60.0, True),        # [0.4, 0.6]
    ("snapkv", 64, "hotpotqa"): (40.0, 0.0, 40.0, 40.0, True),         # [0.4, 0.4]
    ("snapkv", 64, "qasper"): (40.0, -1.0, 30.0, 50.0, True),          # [0.3, 0.5]
    ("snapkv", 256, "avg"): (47.5, -2.5, 37.5, 57.5, True),            # run score 0.475
    ("snapkv", 256, "hotpotqa"): (40.0, 10.0, 30.0, 50.0, True),       # [0.3, 0.5]: 30 on the CI's edge
    ("streaming_llm", 256, "hotpotqa"): (60.0, 2.0, 60.0, 60.0, False),  # [0.6, 0.6]: 58 is outside
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    (d / "toy.yaml").write_text(yaml.safe_dump(PRESET))
    root = make_results(d / "results")
    return d, root, load_preset(d / "toy.yaml")


def test_published_rows_hand_computed(toy):
    from kvbench.report.load import find_runs, load_table
    _, root, preset = toy
    rows = published_rows(preset, load_table(find_runs(root)))
    assert len(rows) == 8
    got = {(r["method"], None if r["budget"] is None else int(r["budget"]), r["subtask"]): r for r in rows}
    for key, (ours, diff, lo, hi, inside) in EXPECTED.items():
        r = got[key]
        assert r["ours"] == pytest.approx(ours) and r["diff"] == pytest.approx(diff), key
        assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo), pytest.approx(hi)), key
        assert r["inside_ci"] is inside, key
    miss = got[("snapkv", 1024, "hotpotqa")]  # a budget we did not run
    assert math.isnan(miss["ours"]) and miss["inside_ci"] is None


def test_report_prints_published_and_draws_hollow_markers(toy, capsys, monkeypatch):
    from kvbench.report import plots
    d, root, _ = toy
    figs = {}
    orig = plots.Figures.save

    def keep(self, fig, name):
        if name.startswith("published__"):
            figs[name] = [(c.get_facecolors().copy(), c.get_edgecolors().copy()) for ax in fig.axes
                          for c in ax.collections]
        orig(self, fig, name)
    monkeypatch.setattr(plots.Figures, "save", keep)
    out = d / "report"
    assert report_main([str(root), "--out", str(out), "--experiment", str(d / "toy.yaml")]) == 0
    text = capsys.readouterr().out
    assert "published vs ours: Toy table" in text and "source: A paper, Table 9" in text
    line = next(l for l in text.splitlines() if l.startswith("streaming_llm") and "hotpotqa" in l)
    assert line.split() == ["streaming_llm", "256", "hotpotqa", "58.00", "60.00", "+2.00", "[60.00,", "60.00]", "no"]
    md = (out / "published.md").read_text()
    assert "| snapkv | 256 | avg | 50.00 | 47.50 | -2.50 | [37.50, 57.50] | yes |" in md
    assert "| snapkv | 1024 | hotpotqa | 50.00 | – | – | – | – |" in md
    assert "8 published cells: 7 with our CI, 6 inside it, 1 not run here." in md
    assert "| snapkv | 256 | avg | 50.00 | 47.50 |" in (out / "table.md").read_text()
    html = (out / "index.html").read_text()
    assert "Published vs ours: Toy table" in html and '<td class="no">no</td>' in html
    # the published figure: published points are hollow (no face colour), ours filled
    (name, colls), = figs.items()
    hollow = [c for c in colls if len(c[0]) == 0 or (c[0][:, 3] == 0).all()]
    assert len(hollow) == 6  # snapkv 64 (2), snapkv 256 (2), streaming_llm 256, snapkv 1024: 6 points
    assert (out / "figures" / f"{name}.png").exists() and (out / "figures" / f"{name}.pdf").exists()


def test_preset_found_by_sweep(toy):
    """A results dir made by a preset (its runs' config says sweep=<preset sweep>) finds its preset."""
    from kvbench.report.experiments import find_preset_for
    from kvbench.report.load import find_runs
    runs = find_runs(toy[1])
    assert find_preset_for(runs) is None  # the fake runs name no sweep
    for r in runs:
        r.config["sweep"] = "pyramidkv_longbench_llama3"
    assert find_preset_for(runs).name == "pyramidkv_longbench_llama3"


def test_average_compared_only_over_the_same_tasks(toy):
    """A published average over tasks we did not all run is not compared with our mean over fewer tasks."""
    from kvbench.report.load import find_runs, load_table
    d, root, _ = toy
    p = dict(PRESET, published=[{"method": "full", "scores": {"qasper": 65.0, "hotpotqa": 55.0, "avg": 60.0}},
                                {"method": "full", "scores": {"qasper": 65.0, "narrativeqa": 20.0, "avg": 42.5}}])
    (d / "avg.yaml").write_text(yaml.safe_dump(p))
    rows = published_rows(load_preset(d / "avg.yaml"), load_table(find_runs(root)))
    avg = [r for r in rows if r["subtask"] == "avg"]
    assert avg[0]["ours"] == pytest.approx(55.0) and avg[0]["diff"] == pytest.approx(-5.0)  # both tasks ran
    assert math.isnan(avg[1]["ours"]) and avg[1]["inside_ci"] is None  # narrativeqa did not run
