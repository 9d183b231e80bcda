"""The self-contained HTML dashboard (index.html): overview cards, paper tables, every figure embedded
as a base64 PNG, and the full tidy table. No script, font or image is fetched from the network."""
from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import jinja2
import pandas as pd

from .load import ALL
from .tables import PaperTable, df_to_html, formatted, to_html

TEMPLATES = Path(__file__).parent / "templates"

# Figure sections, by file-name prefix (see plots.make_plots).
SECTIONS = [("score_vs_budget", "Score vs budget"), ("pareto", "Score vs KV memory"),
            ("niah", "NIAH heatmaps"), ("subtasks", "Per-subtask scores"), ("latency", "Latency")]


def render(df: pd.DataFrame, tables: list[PaperTable], figures: list[str], out_dir: Path,
           source: str, title: str = "kvbench report") -> str:
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
        figs = [{"name": f, "b64": base64.b64encode((out_dir / "figures" / f"{f}.png").read_bytes()).decode()}
                for f in figures if f.startswith(prefix + "__")]
        if figs:
            sections.append({"id": prefix, "title": name, "figures": figs})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    return env.get_template("dashboard.html.j2").render(
        title=title, source=source, generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        cards=cards, failed=failed, paper_tables=[to_html(t) for t in tables],
        figure_sections=sections, tidy=df_to_html(formatted(df)))


def write_dashboard(df, tables, figures, out_dir: Path, source: str, title: str = "kvbench report") -> Path:
    path = Path(out_dir) / "index.html"
    path.write_text(render(df, tables, figures, out_dir, source, title), encoding="utf-8")
    return path
