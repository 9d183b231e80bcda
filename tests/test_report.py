"""`kvbench report`: every table value checked against hand computations on a small fake sweep.

The sweep (`make_results`): model "tiny", methods full / snapkv / streaming_llm at budgets 64 and 256
(plus one failed h2o run), on
  - "niah": 6 records per run, lengths 1000/2000 × depths 0/50/100; which needles are found is listed
    by hand in FOUND below;
  - "longbench": 4 records per run, 2 per subtask (hotpotqa, qasper), scores listed in LB_SCORES.
KV bytes are 2048 bytes per kept token; kept = min(budget, context) (the full cache keeps everything).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kvbench.report import progress, report_main
from kvbench.report.plots import niah_grid, pareto_front

BPT = 2048  # KV bytes per token (fake model)
LENGTHS, DEPTHS = [1000, 2000], [0, 50, 100]
# (method, budget) -> the (length, depth) needles found (score 1; else 0)
ALL_CELLS = {(L, D) for L in LENGTHS for D in DEPTHS}
FOUND = {
    ("full", None): ALL_CELLS,                                              # 6/6 = 100.0
    ("snapkv", 64): {(1000, 100), (2000, 100), (1000, 50)},                 # 3/6 = 50.0
    ("snapkv", 256): ALL_CELLS - {(2000, 0)},                               # 5/6 = 83.3
    ("streaming_llm", 64): {(1000, 100)},                                   # 1/6 = 16.7
    ("streaming_llm", 256): {(1000, 100), (2000, 100)},                     # 2/6 = 33.3
}
# (method, budget) -> {subtask: [score of record 0, record 1]}
LB_SCORES = {
    ("full", None): {"qasper": [0.5, 0.7], "hotpotqa": [0.4, 0.6]},          # 60.0, 50.0, avg 55.0
    ("snapkv", 64): {"qasper": [0.3, 0.5], "hotpotqa": [0.4, 0.4]},          # 40.0, 40.0, avg 40.0
    ("snapkv", 256): {"qasper": [0.5, 0.6], "hotpotqa": [0.3, 0.5]},         # 55.0, 40.0, avg 47.5
    ("streaming_llm", 64): {"qasper": [0.2, 0.2], "hotpotqa": [0.5, 0.3]},   # 20.0, 40.0, avg 30.0
    ("streaming_llm", 256): {"qasper": [0.4, 0.2], "hotpotqa": [0.6, 0.6]},  # 30.0, 60.0, avg 45.0
}


def record(i, method, budget, score, context, meta):
    kept = context if budget is None else min(budget, context)
    return {"sample_id": f"s{i}", "query_idx": 0, "status": "ok", "error_type": None, "error": None,
            "score": score, "prediction": "p", "answers": ["a"], "ttft_ms": context * 0.01 + kept * 0.001,
            "prefill_ms": context * 0.01, "compress_ms": 0.5, "decode_ms_per_token": 1.0 + kept * 0.001,
            "new_tokens": 8, "kv_bytes": kept * BPT, "kv_bytes_full": context * BPT,
            "peak_mem_bytes": 10**8 + kept * BPT, "decode_flops_per_token": kept * 1000.0,
            "context_tokens": context, "kept_tokens": kept, "meta": meta}


def mean(xs):
    return sum(xs) / len(xs)


def write_run(root: Path, task, method, budget, records, status="ok", error_type=None, error=None,
              seed=0, model="tiny", query_aware=True):
    """A run dir in the engine's layout; the summary's means are plain means of the ok records."""
    h = f"{task}-{method}-{budget}-{seed}"
    config = {"model": {"name": model}, "task": {"name": task}, "method": {"name": method},
              "budget": budget, "query_aware": query_aware, "seed": seed}
    ok = [r for r in records if r["status"] == "ok"]
    m = lambda k: mean([r[k] for r in ok]) if ok else None
    subs = {}
    for r in ok:
        if "subtask" in r["meta"]:
            subs.setdefault(r["meta"]["subtask"], []).append(r["score"])
    score = m("score")
    summary = {"run_id": h, "config_hash": h, "config": config, "model": model, "task": task,
               "method": method, "budget": budget, "query_aware": query_aware, "status": status,
               "error_type": error_type, "error": error, "n": len(ok), "n_failed": len(records) - len(ok),
               "score": score, "score_ci_low": None if score is None else max(0.0, score - 0.1),
               "score_ci_high": None if score is None else min(1.0, score + 0.1),
               "kv_bytes": m("kv_bytes"), "kv_bytes_full": m("kv_bytes_full"),
               "kv_ratio": m("kv_bytes") / m("kv_bytes_full") if ok else None,
               "peak_mem_bytes": m("peak_mem_bytes"), "ttft_ms": m("ttft_ms"), "compress_ms": m("compress_ms"),
               "decode_ms_per_token": m("decode_ms_per_token"),
               "decode_flops_per_token": m("decode_flops_per_token"),
               "extra": {f"score/{k}": mean(v) for k, v in subs.items()},
               "versions": {"torch": "x"}, "git_commit": "abc", "started_at": "t0", "finished_at": "t1",
               "wall_s": 1.0}
    d = root / "sweep" / h  # one level deeper than the sweep root: run dirs may sit at any depth
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def make_results(root: Path) -> Path:
    for (method, budget), found in FOUND.items():
        recs = [record(i, method, budget, float((L, D) in found), L, {"length": L, "depth": D})
                for i, (L, D) in enumerate((L, D) for L in LENGTHS for D in DEPTHS)]
        write_run(root, "niah", method, budget, recs)
    for (method, budget), subs in LB_SCORES.items():
        recs = [record(f"{s}{i}", method, budget, sc, 1000, {"subtask": s})
                for s, scores in subs.items() for i, sc in enumerate(scores)]
        write_run(root, "longbench", method, budget, recs)
    write_run(root, "niah", "h2o", 64, [], status="failed", error_type="OutOfMemoryError",
              error="CUDA out of memory")
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("results"))
    out = root.parent / (root.name + "_report")
    assert report_main([str(root), "--out", str(out)]) == 0
    return root, out


def row(df, task, method, budget, subtask="all"):
    sel = df[(df.task == task) & (df.method == method) & (df.subtask == subtask)]
    sel = sel[sel.budget.isna()] if budget is None else sel[sel.budget == budget]
    assert len(sel) == 1
    return sel.iloc[0]


def test_csv_values(report):
    _, out = report
    df = pd.read_csv(out / "table.csv")
    assert len(df[df.subtask == "all"]) == 11  # 5 niah + 5 longbench + 1 failed
    assert len(df[df.subtask != "all"]) == 10  # 5 longbench runs × 2 subtasks
    r = row(df, "niah", "snapkv", 256)
    assert r.score == pytest.approx(5 / 6)
    assert r.kv_bytes == 256 * BPT and r.kv_bytes_full == 1500 * BPT
    assert r.kv_ratio == pytest.approx(256 / 1500)
    assert r.n == 6 and r.n_failed == 0 and r.status == "ok" and r.budget_label == "256"
    assert r.decode_flops_per_token == 256 * 1000
    r = row(df, "niah", "full", None)
    assert r.score == 1.0 and r.kv_ratio == 1.0 and r.budget_label == "full"
    # subtask rows: score from `extra`, counts and memory from that subtask's records
    r = row(df, "longbench", "streaming_llm", 256, "hotpotqa")
    assert r.score == pytest.approx(0.6) and r.n == 2
    assert r.kv_ratio == pytest.approx(256 / 1000)
    assert r.score_ci_low == pytest.approx(0.6) and r.score_ci_high == pytest.approx(0.6)  # both records 0.6
    r = row(df, "longbench", "snapkv", 64, "qasper")
    assert r.score == pytest.approx(0.4)
    assert 0.3 <= r.score_ci_low <= 0.4 <= r.score_ci_high <= 0.5
    assert row(df, "longbench", "snapkv", 256).score == pytest.approx(0.475)
    r = row(df, "niah", "h2o", 64)
    assert r.status == "failed" and math.isnan(r.score) and r.error_type == "OutOfMemoryError"


def test_markdown_tables(report):
    _, out = report
    md = (out / "table.md").read_text()
    # niah by budget: full on top, best compressed method per column in bold
    assert "| Method | 64 | 256 |" in md
    assert "| Full cache | 100.0 | 100.0 |" in md
    assert "| snapkv | **50.0** | **83.3** |" in md
    assert "| streaming_llm | 16.7 | 33.3 |" in md
    assert "| h2o | – | – |" in md
    # longbench by budget and per subtask (columns hotpotqa, qasper, Overall = the run's score over all samples)
    assert "| snapkv | **40.0** | **47.5** |" in md
    assert "| streaming_llm | 30.0 | 45.0 |" in md
    assert "| Method | hotpotqa | qasper | Overall |" in md
    assert "| Full cache | 50.0 | 60.0 | 55.0 |" in md
    assert "| snapkv | **40.0** | **40.0** | **40.0** |" in md          # budget 64; hotpotqa is a tie
    assert "| streaming_llm | **40.0** | 20.0 | 30.0 |" in md
    assert "| snapkv | 40.0 | **55.0** | **47.5** |" in md              # budget 256
    assert "| streaming_llm | **60.0** | 30.0 | 45.0 |" in md
    # the tidy table: score with CI, KV in MiB (256 × 2048 B = 0.50 MiB), ratio
    assert "| tiny | niah | all | snapkv | 256 | 83.3 [73.3, 93.3] | 0.50 | 0.171 |" in md


def test_latex_table(report):
    _, out = report
    tex = (out / "table.tex").read_text()
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 4  # 2 budget tables + 2 subtask tables
    assert r"snapkv & \textbf{50.0} & \textbf{83.3} \\" in tex
    assert r"streaming\_llm & 16.7 & 33.3 \\" in tex
    assert "Full cache & 100.0 & 100.0 \\\\\n\\midrule" in tex
    assert r"\begin{tabular}{lrr}" in tex


EXPECTED_FIGURES = [
    "score_vs_budget__niah", "pareto__niah", "latency__niah",
    "score_vs_budget__longbench", "pareto__longbench", "latency__longbench",
    "subtasks__longbench__64", "subtasks__longbench__256",
    "niah__niah__full__full", "niah__niah__snapkv__64", "niah__niah__snapkv__256",
    "niah__niah__streaming_llm__64", "niah__niah__streaming_llm__256",
]


def test_figures_exist(report):
    _, out = report
    names = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert names == sorted(EXPECTED_FIGURES)  # no heatmap for the failed h2o run (no records)
    for n in EXPECTED_FIGURES:
        png, pdf = out / "figures" / f"{n}.png", out / "figures" / f"{n}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


def test_dashboard_self_contained(report):
    _, out = report
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == len(EXPECTED_FIGURES)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "OutOfMemoryError" in html  # the failed run is listed
    assert "<b>83.3</b>" in html


def test_niah_grid_and_pareto():
    recs = [record(0, "snapkv", 64, float((L, D) in FOUND[("snapkv", 64)]), L, {"length": L, "depth": D})
            for L in LENGTHS for D in DEPTHS]
    g = niah_grid(recs)
    assert list(g.index) == [0, 50, 100] and list(g.columns) == [1000, 2000]
    assert g.to_numpy().tolist() == [[0, 0], [100, 0], [100, 100]]
    # depth as a fraction is shown in percent
    for r in recs:
        r["meta"]["depth"] = r["meta"]["depth"] / 100
    assert list(niah_grid(recs).index) == [0, 50, 100]
    # (memory, score): (2, 50) is dominated by (1, 60); (4, 60) by (1, 60)
    assert pareto_front([(4, 60), (1, 60), (2, 50), (8, 90), (0.5, 10)]) == [(0.5, 10), (1, 60), (8, 90)]


def test_bad_input(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope")]) == 2
    assert report_main([str(tmp_path)]) == 2  # exists, but no runs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "no runs" in err[1]


def test_default_out_dir(tmp_path, monkeypatch):
    root = tmp_path / "mysweep"
    write_run(root, "niah", "full", None, [record(0, "full", None, 1.0, 1000, {"length": 1000, "depth": 0})])
    monkeypatch.chdir(tmp_path)
    assert report_main([str(root), "--no-plots"]) == 0
    assert (tmp_path / "reports" / "mysweep" / "table.csv").exists()
    assert (tmp_path / "reports" / "mysweep" / "index.html").exists()


def test_progress_quiet_without_tty():
    bar = progress(iter(range(5)), total=5, desc="x")
    assert list(bar) == [0, 1, 2, 3, 4]
    assert bar.disable == (not sys.stderr.isatty())


def test_wandb_missing(monkeypatch, tmp_path):
    from kvbench.report import wandb_logger
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        wandb_logger.log_run(tmp_path, {})


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from kvbench.report.wandb_logger import log_run
    root = make_results(tmp_path / "res")
    run_dir = next(p for p in (root / "sweep").iterdir() if p.name.startswith("niah-snapkv-64"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    local = log_run(run_dir, yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert local.exists() and str(local).startswith(str(run_dir))
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    table = next((offline[0] / "files" / "media" / "table").glob("samples_*.table.json"))
    data = json.loads(table.read_text())
    assert len(data["data"]) == 6 and "meta.depth" in data["columns"]  # one row per record
    assert list((offline[0] / "files" / "media" / "images" / "figures").glob("niah_*.png"))


def test_screenshot(report, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import screenshot_dashboard as sd
    if sd.find_chromium() is None:
        pytest.skip("chromium not installed")
    _, out = report
    png = tmp_path / "shot.png"
    assert sd.main([str(out), str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


# -- issue 11 (reports) and issue 17 (paper output) -----------------------------------------------------------
def test_marginals_apart_from_subtasks(tmp_path):
    """depth= / length= marginals and a subtask at one length are not subtask columns; aggregates (avg_en)
    follow the subtasks; Overall is the run's own score, not a mean of the columns."""
    from kvbench.report.load import find_runs, load_table, subtask_kind
    from kvbench.report.tables import paper_tables
    assert [subtask_kind(s) for s in ["hotpotqa", "depth=25", "length=1000", "niah_single_1/4096", "avg_en",
                                      "cat/code", "all"]] == ["subtask", "marginal", "marginal", "marginal",
                                                             "aggregate", "aggregate", "all"]
    recs = [record(i, "snapkv", 64, sc, L, {"length": L, "depth": D, "subtask": sub})
            for i, (L, D, sub, sc) in enumerate([(1000, 0, "a", 1.0), (1000, 100, "a", 0.0), (2000, 0, "b", 1.0),
                                                 (2000, 100, "b", 1.0)])]
    d = write_run(tmp_path, "t", "snapkv", 64, recs)
    s = json.loads((d / "summary.json").read_text())
    s["extra"].update({"score/depth=0": 1.0, "score/depth=100": 0.5, "score/length=1000": 0.5,
                       "score/length=2000": 1.0, "score/avg_en": 0.75})
    (d / "summary.json").write_text(json.dumps(s))
    tabs = {t.title: t for t in paper_tables(load_table(find_runs(tmp_path)))}
    per = tabs["t: score ×100 per subtask, budget 64"]
    assert per.columns == ["a", "b", "avg_en", "Overall"]
    assert per.rows[0][1] == [0.5, 1.0, 0.75, 0.75]
    marg = tabs["t: score ×100 by grid slice (marginals), budget 64"]
    assert marg.columns == ["depth=0", "depth=100", "length=1000", "length=2000", "Overall"]
    assert marg.rows[0][1] == [1.0, 0.5, 0.5, 1.0, 0.75]


def test_dashboard_settings_units_wide_and_unique_rows(tmp_path):
    root = make_results(tmp_path / "res")
    # a second seed of one cell with the same numbers: one row in "All runs"
    recs = [record(i, "snapkv", 64, float((L, D) in FOUND[("snapkv", 64)]), L, {"length": L, "depth": D})
            for i, (L, D) in enumerate((L, D) for L in LENGTHS for D in DEPTHS)]
    write_run(root, "niah", "snapkv", 64, recs, seed=1)
    for sp in root.rglob("summary.json"):
        s = json.loads(sp.read_text())
        s.update(conditions={"device": "cpu", "cpu_count": 2, "torch_threads": 1, "loaded": False},
                 versions={"torch": "2.9.0", "transformers": "5.24.0"}, git_commit_date="2026-11-27T10:00:00+00:00")
        sp.write_text(json.dumps(s))
    out = tmp_path / "rep"
    assert report_main([str(root), "--out", str(out)]) == 0
    html = (out / "index.html").read_text()
    settings = html[html.index('id="settings"'):html.index('id="overview"')]
    for text in ["tiny (dtype –)", "query_aware", "budgets 64, 256", "cpu · 2 CPUs · torch threads 1",
                 "torch 2.9.0; transformers 5.24.0", "abc (2026-11-27)"]:
        assert text in settings, text
    assert "KV MiB" in html and "kv MB" not in html
    wide = [l for l in html.splitlines() if '<figure class="wide">' in l]
    assert {l.split('alt="')[1].split("__")[0] for l in wide} == {"latency", "subtasks"}
    runs = html[html.index('id="runs"'):]
    tidy = runs[:runs.index("</table>")]
    assert tidy.count("<tr>") == 1 + 11  # header + 11 distinct whole-run rows (the seed-1 copy merged)
    md = (out / "table.md").read_text()
    assert md.count("| tiny | niah | all | snapkv | 64 |") == 1


def test_colours_and_markers():
    from kvbench.report.plots import OKABE_ITO, dodge_factors, method_colors, method_markers, paper_name
    a = method_colors(["full", "streaming_llm", "snapkv"])
    b = method_colors(["snapkv", "h2o", "full", "cake"])
    assert a["snapkv"] == b["snapkv"] == OKABE_ITO[0] and a["full"] == "black"  # same colour in every report
    assert a["streaming_llm"] == OKABE_ITO[2] and b["h2o"] == OKABE_ITO[3]
    c = method_colors(["snapkv (q-aware)", "snapkv (q-agnostic)"])
    assert c["snapkv (q-aware)"] == c["snapkv (q-agnostic)"]  # one method, one colour; markers tell them apart
    d = method_colors(["full (q-aware)", "full (q-agnostic)", "snapkv (q-aware)"])  # the full cache both ways
    assert d["full (q-aware)"] == d["full (q-agnostic)"] == "black"
    m = method_markers(["snapkv (q-aware)", "snapkv (q-agnostic)", "full"])
    assert len({m["snapkv (q-aware)"], m["snapkv (q-agnostic)"]}) == 2
    f = dodge_factors(["full", "snapkv", "streaming_llm", "h2o"])
    assert f["full"] == 1.0 and f["streaming_llm"] == 1.0 and f["snapkv"] == pytest.approx(1 / 1.03)
    assert [paper_name(x) for x in ["snapkv", "pyramidkv", "h2o", "streaming_llm", "adakv (q-aware)", "new"]] == \
        ["SnapKV", "PyramidKV", "H2O", "StreamingLLM", "AdaKV (q-aware)", "new"]


def _pdf_fonts(data: bytes) -> tuple[int, int]:
    """(embedded TrueType font programs, Type 3 fonts) in a matplotlib PDF (its objects are not in streams)."""
    return data.count(b"/FontFile2"), data.count(b"/Subtype /Type3")


def test_paper_output(report, tmp_path):
    import re
    import shutil
    import subprocess
    root, _ = report
    out = tmp_path / "rep"
    assert report_main([str(root), "--out", str(out), "--paper", "--ci", "pm"]) == 0
    paper = out / "paper"
    pdfs = sorted((paper / "figures").glob("*.pdf"))
    assert len(pdfs) == len(EXPECTED_FIGURES) and not list((paper / "figures").glob("*.png"))
    for pdf in pdfs:
        data = pdf.read_bytes()
        embedded, type3 = _pdf_fonts(data)
        assert data[:5] == b"%PDF-" and embedded >= 1 and type3 == 0, pdf.name
        box = re.search(rb"/MediaBox \[ *0 0 ([\d.]+) ([\d.]+) *\]", data)
        width_in = float(box.group(1)) / 72
        wide = pdf.stem.startswith(("latency", "subtasks"))
        assert (6.0 < width_in < 7.2) if wide else (2.5 < width_in < 3.6), (pdf.name, width_in)
    tex = "".join(t.read_text() for t in sorted((paper / "tables").glob("*.tex")))  # paper names, CI as ±
    assert r"SnapKV & \textbf{50.0{\scriptsize$\pm$10.0}} & \textbf{83.3{\scriptsize$\pm$10.0}} \\" in tex
    assert "StreamingLLM & " in tex and "streaming" not in tex
    main = (paper / "main.tex").read_text()
    assert main.count(r"\begin{figure") == main.count(r"\end{figure") == len(EXPECTED_FIGURES)
    assert main.count(r"\begin{figure*}") == 4  # latency ×2, subtasks ×2: page-wide
    for inc in re.findall(r"\\includegraphics\[[^]]*\]\{([^}]*)\}", main):
        assert (paper / inc).is_file(), inc
    for inp in re.findall(r"\\input\{([^}]*)\}", main):
        assert (paper / f"{inp}.tex").is_file(), inp
    assert main.strip().endswith(r"\end{document}")
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-recommended): checked structurally")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "main.tex"], cwd=paper,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (paper / "main.pdf").read_bytes()[:5] == b"%PDF-"
