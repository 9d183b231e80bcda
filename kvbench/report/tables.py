"""Paper-style result tables (methods as rows, budgets or subtasks as columns) in Markdown, LaTeX
(booktabs) and HTML, plus the formatted tidy table.

The layout follows the KV-cache compression papers (SnapKV, PyramidKV, AdaKV tables on LongBench;
RULER/NIAH tables by budget): the full-cache row on top as the reference, compressed methods below,
scores ×100, the best compressed method of each column in bold (the full cache is not a competitor,
so it is never bolded).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import pandas as pd
import re

from .load import ALL

DIGITS = 1  # decimals of scores ×100


@dataclass
class PaperTable:
    title: str
    columns: list[str]                       # column headers after the "Method" column
    rows: list[tuple[str, list[float], bool]]  # (method label, values in [0,1] or NaN, is_full)

    def cells(self) -> list[list[str]]:
        return [[fmt_score(v) for v in vals] for _, vals, _ in self.rows]

    def bold(self) -> list[list[bool]]:
        """Best non-full value per column (compared as displayed, so displayed ties are all bold)."""
        shown = [[round(v * 100, DIGITS) if not _nan(v) else None for v in vals] for _, vals, _ in self.rows]
        out = [[False] * len(self.columns) for _ in self.rows]
        for j in range(len(self.columns)):
            cand = [shown[i][j] for i, (_, _, full) in enumerate(self.rows) if not full and shown[i][j] is not None]
            if not cand:
                continue
            best = max(cand)
            for i, (_, _, full) in enumerate(self.rows):
                out[i][j] = not full and shown[i][j] == best
        return out


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_score(v) -> str:
    return "–" if _nan(v) else f"{v * 100:.{DIGITS}f}"


def _budget_key(label: str):
    """Sort budget labels: numeric budgets ascending, then ratios/other, "full" last."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (2 if label == "full" else 1, 0.0, label)


def _mean_score(df: pd.DataFrame) -> float:
    """Mean over repeated runs (seeds) of the same cell; NaN when every run failed."""
    s = df["score"].dropna()
    return float(s.mean()) if len(s) else math.nan


def paper_tables(df: pd.DataFrame) -> list[PaperTable]:
    """One budget table per (model, task), and one subtask table per (model, task, budget) for tasks
    with subtasks (LongBench style: subtasks as columns, plus the task's average)."""
    out = []
    models = df["model"].dropna().unique()
    for (model, task), g in df.groupby(["model", "task"], sort=False):
        suffix = f" ({model})" if len(models) > 1 else ""
        whole = g[g["subtask"] == ALL]
        full = whole[whole["method"] == "full"]
        comp = whole[whole["method"] != "full"]
        budgets = sorted(comp["budget_label"].unique(), key=_budget_key) or ["full"]
        rows = []
        if len(full):
            rows.append(("Full cache", [_mean_score(full)] * len(budgets), True))
        for label, mg in comp.groupby("method_label", sort=False):
            rows.append((label, [_mean_score(mg[mg["budget_label"] == b]) for b in budgets], False))
        out.append(PaperTable(f"{task}: score ×100 by KV budget (tokens per head){suffix}", budgets, rows))

        subs = sorted((s for s in g["subtask"].unique() if s != ALL), key=_natural_key)
        if not subs:
            continue
        for b in budgets:
            sel = g[(g["budget_label"] == b) | (g["method"] == "full")]
            rows = []
            for label, mg in sel.groupby("method_label", sort=False):
                is_full = bool((mg["method"] == "full").all())
                vals = [_mean_score(mg[mg["subtask"] == s]) for s in subs] + [_mean_score(mg[mg["subtask"] == ALL])]
                rows.append(("Full cache" if is_full else label, vals, is_full))
            rows.sort(key=lambda r: not r[2])  # full cache on top
            out.append(PaperTable(f"{task}: score ×100 per subtask, budget {b}{suffix}", subs + ["Avg."], rows))
    return out


# ---------------------------------------------------------------- renderers
def to_markdown(t: PaperTable) -> str:
    cells, bold = t.cells(), t.bold()
    lines = [f"**{t.title}**", "", "| Method | " + " | ".join(t.columns) + " |",
             "|---|" + "---:|" * len(t.columns)]
    for (label, _, _), row, b in zip(t.rows, cells, bold):
        vals = [f"**{c}**" if bb else c for c, bb in zip(row, b)]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "×": r"$\times$",
        "–": "--"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(c, c) for c in str(s))


def to_latex(t: PaperTable) -> str:
    cells, bold = t.cells(), t.bold()
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * len(t.columns) + "}", r"\toprule",
             "Method & " + " & ".join(tex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    for i, ((label, _, full), row, b) in enumerate(zip(t.rows, cells, bold)):
        vals = [rf"\textbf{{{tex_escape(c)}}}" if bb else tex_escape(c) for c, bb in zip(row, b)]
        lines.append(tex_escape(label) + " & " + " & ".join(vals) + r" \\")
        if full and i + 1 < len(t.rows) and not t.rows[i + 1][2]:
            lines.append(r"\midrule")  # rule between the reference row and the compressed methods
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{tex_escape(t.title)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(t: PaperTable) -> str:
    cells, bold = t.cells(), t.bold()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["Method"] + t.columns)
    body = []
    for (label, _, full), row, b in zip(t.rows, cells, bold):
        tds = "".join(f"<td>{'<b>' + c + '</b>' if bb else c}</td>" for c, bb in zip(row, b))
        cls = ' class="full"' if full else ""
        body.append(f"<tr{cls}><th>{html.escape(label)}</th>{tds}</tr>")
    return (f"<table class=\"paper\"><caption>{html.escape(t.title)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


# ---------------------------------------------------------------- tidy table, formatted
def _mib(v) -> str:
    return "–" if _nan(v) else f"{v / 2**20:.2f}"


def _f(v, d=1) -> str:
    return "–" if _nan(v) else f"{v:.{d}f}"


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """The tidy table as display strings: scores ×100 with the CI, memory in MiB, FLOPs in GFLOPs."""
    def score(r):
        if _nan(r["score"]):
            return "–"
        ci = "" if _nan(r["score_ci_low"]) else f" [{r['score_ci_low'] * 100:.1f}, {r['score_ci_high'] * 100:.1f}]"
        return f"{r['score'] * 100:.1f}{ci}"
    out = pd.DataFrame({
        "model": df["model"], "task": df["task"], "subtask": df["subtask"], "method": df["method_label"],
        "budget": df["budget_label"], "score ×100 [95% CI]": df.apply(score, axis=1),
        "KV MiB": df["kv_bytes"].map(_mib), "KV ratio": df["kv_ratio"].map(lambda v: _f(v, 3)),
        "max KV held MiB": df["kv_bytes_held_max"].map(_mib), "peak MiB": df["peak_mem_bytes"].map(_mib),
        # TTFT with the context's prefill + compression, and TTFT of a query on a context compressed before
        "TTFT ms mean / median": [_pair(a, b) for a, b in zip(df["ttft_ms"], df["ttft_ms_median"])],
        "reused-context TTFT ms mean / median": [_pair(a, b) for a, b in zip(df["ttft_reused_ms"],
                                                                               df["ttft_reused_ms_median"])],
        "decode ms/tok mean / median": [_pair(a, b, 2) for a, b in zip(df["decode_ms_per_token"],
                                                                        df["decode_ms_per_token_median"])],
        "decode FLOPs/tok": df["decode_flops_per_token"].map(lambda v: "–" if _nan(v) else f"{v:.3g}"),
        "n": df["n"].map(lambda v: _f(v, 0)), "failed": df["n_failed"].map(lambda v: _f(v, 0)),
        "status": df["status"],
        # timed while other processes kept the CPU busy: its timings are inflated (summary: conditions)
        "timing": df["loaded"].map(lambda v: "loaded CPU" if v is True else "ok"),
    })
    return out


def _pair(mean, median, d=1) -> str:
    return "–" if _nan(mean) else f"{_f(mean, d)} / {_f(median, d)}"


def df_to_markdown(df: pd.DataFrame) -> str:
    """Markdown pipe table without the optional `tabulate` dependency."""
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def df_to_html(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table class=\"tidy\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_tables(df: pd.DataFrame, out_dir) -> list[PaperTable]:
    """table.csv (raw tidy table, scores in [0,1]), table.md, table.tex; returns the paper tables."""
    from pathlib import Path
    out_dir = Path(out_dir)
    df.to_csv(out_dir / "table.csv", index=False)
    tables = paper_tables(df)
    md = ["# kvbench results", ""] + [to_markdown(t) for t in tables]
    md += ["## All runs", "", df_to_markdown(formatted(df))]
    (out_dir / "table.md").write_text("\n".join(md))
    tex = ["% kvbench results; needs \\usepackage{booktabs}", ""] + [to_latex(t) for t in tables]
    (out_dir / "table.tex").write_text("\n".join(tex))
    return tables


def _natural_key(name: str):
    """"depth=25" before "depth=100": numbers inside subtask names compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]
