"""The self-contained HTML dashboard (index.html): the settings behind the numbers, overview cards, paper
tables (and a preset's published-vs-ours table), every figure embedded as a base64 PNG (wide figures take the
page width), and the table of all runs. No script, font or image is fetched from the network."""
from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import jinja2
import pandas as pd

from .load import ALL
from .tables import PaperTable, df_to_html, formatted, to_html, unique_rows

TEMPLATES = Path(__file__).parent / "templates"

# Figure sections, by file-name prefix (see plots.make_plots).
SECTIONS = [("published", "Published vs ours, per subtask"), ("score_vs_budget", "Score vs budget"),
            ("pareto", "Score vs KV memory"), ("niah", "NIAH heatmaps"), ("subtasks", "Per-subtask scores"),
            ("latency", "Latency")]
WIDE = ("published", "subtasks", "latency")  # figures that get the page width


def _vals(xs) -> str:
    xs = [x for x in xs if x is not None and x == x]
    uniq = sorted({str(x) for x in xs}, key=lambda v: (len(v), v))
    return ", ".join(uniq) if uniq else "–"


def settings(runs) -> list[dict]:
    """What produced the numbers, from the runs' configs and summaries: model, task grid, query mode,
    budgets/ratios, device and load, versions, commit."""
    if not runs:
        return []
    cfgs = [r.config or {} for r in runs]
    sums = [r.summary or {} for r in runs]
    tasks = {}
    for c in cfgs:
        t = c.get("task") if isinstance(c.get("task"), dict) else {}
        knobs = ", ".join(f"{k}={v}" for k, v in t.items() if k != "name" and v is not None)
        tasks.setdefault(str(t.get("name")), set()).add(knobs)
    budgets = sorted({c.get("budget") for c, s in zip(cfgs, sums) if c.get("budget") is not None
                      and (s.get("method") or (c.get("method") or {}).get("name")) != "full"})
    ratios = sorted({c.get("compression_ratio") for c in cfgs if c.get("compression_ratio") is not None})
    versions = {}
    for s in sums:
        for k, v in (s.get("versions") or {}).items():
            versions.setdefault(k, set()).add(str(v))
    cond = [s.get("conditions") or {} for s in sums]
    loaded = sum(1 for c in cond if c.get("loaded"))
    models = _vals(s.get("model") or (c.get("model") or {}).get("name") for s, c in zip(sums, cfgs))
    rows = [
        {"key": "model", "value": models + f" (dtype {_vals(c.get('dtype') for c in cfgs)})"},
        *[{"key": f"task {name}", "value": " | ".join(sorted(k for k in knobs if k)) or "defaults"}
          for name, knobs in tasks.items()],
        {"key": "query_aware", "value": _vals(c.get("query_aware") for c in cfgs) +
         " (true: compressed with the question, as the SnapKV/PyramidKV papers; false: context compressed "
         "before the question is seen)"},
        {"key": "KV budget / ratio", "value": ("budgets " + ", ".join(str(b) for b in budgets) if budgets else "") +
         ("; " if budgets and ratios else "") + ("compression ratios " + ", ".join(map(str, ratios)) if ratios else "")
         or "full cache only"},
        {"key": "device", "value": _vals(c.get("device") for c in cond) +
         f" · {_vals(c.get('cpu_count') for c in cond)} CPUs · torch threads {_vals(c.get('torch_threads') for c in cond)}"
         + (f" · {loaded} run(s) timed on a loaded CPU" if loaded else ""), "bad": loaded > 0},
        {"key": "versions", "value": "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in sorted(versions.items())) or "–"},
        {"key": "git commit", "value": _vals((s.get("git_commit") or "")[:10] + (f" ({s['git_commit_date'][:10]})"
                                               if s.get("git_commit_date") else "") for s in sums if s.get("git_commit"))},
    ]
    return rows


def render(df: pd.DataFrame, tables: list[PaperTable], figures: list[str], out_dir: Path,
           source: str, title: str = "kvbench report", runs=None, preset=None, published=None) -> str:
    out_dir = Path(out_dir)
    whole = df[df["subtask"] == ALL]
    bad = whole[whole["status"] != "ok"]
    cards = [
        {"key": "runs", "value": len(whole)},
        {"key": "models", "value": whole["model"].nunique()},
        {"key": "tasks", "value": whole["task"].nunique()},
        {"key": "methods", "value": whole["method"].nunique()},
        {"key": "samples (ok)", "value": int(whole["n"].fillna(0).sum())},
        {"key": "failed runs", "value": len(bad), "bad": len(bad) > 0},
        {"key": "failed samples", "value": int(whole["n_failed"].fillna(0).sum()),
         "bad": whole["n_failed"].fillna(0).sum() > 0},
    ]
    failed = [{"model": r.model, "task": r.task, "method": r.method_label, "budget": r.budget_label,
               "status": r.status, "error": f"{r.error_type or ''}: {r.error or ''}".strip(": "),
               "run_dir": r.run_dir} for r in bad.itertuples()]
    sections = []
    for prefix, name in SECTIONS:
        figs = [{"name": f, "wide": prefix in WIDE,
                 "b64": base64.b64encode((out_dir / "figures" / f"{f}.png").read_bytes()).decode()}
                for f in figures if f.startswith(prefix + "__")]
        if figs:
            sections.append({"id": prefix, "title": name, "figures": figs})
    pub = None
    if preset is not None:
        from .experiments import HEAD, _cells, model_note, source_line
        rows = published or []
        ran = [r for r in rows if r["ours"] == r["ours"]]  # not NaN: cells we ran
        pub = {"title": preset.title, "source": source_line(preset), "notes": preset.notes, "head": HEAD,
               "rows": [_cells(r) for r in ran], "all_rows": [_cells(r) for r in rows] if len(ran) < len(rows) else [],
               "n_all": len(rows), "note": model_note(preset, rows)}
    all_runs = unique_rows(formatted(whole))
    sub_rows = unique_rows(formatted(df[df["subtask"] != ALL]))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    return env.get_template("dashboard.html.j2").render(
        title=title, source=source, generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        settings=settings(runs or []), cards=cards, failed=failed, paper_tables=[to_html(t) for t in tables],
        published=pub, figure_sections=sections, tidy=df_to_html(all_runs), n_runs=len(all_runs),
        subtidy=df_to_html(sub_rows) if len(sub_rows) else "", n_sub=len(sub_rows))


def write_dashboard(df, tables, figures, out_dir: Path, source: str, title: str = "kvbench report",
                    runs=None, preset=None, published=None) -> Path:
    path = Path(out_dir) / "index.html"
    path.write_text(render(df, tables, figures, out_dir, source, title, runs, preset, published), encoding="utf-8")
    return path
