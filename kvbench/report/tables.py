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
    ci: list[list[tuple[float, float]]] | None = None  # per row, per column: bootstrap 95% CI in [0,1] (or NaN)
    note: str = ""                                   # one line under the caption

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


def _mean_ci(df: pd.DataFrame) -> tuple[float, float]:
    d = df[df["score"].notna()]
    if not len(d) or d["score_ci_low"].isna().any():
        return math.nan, math.nan
    return float(d["score_ci_low"].mean()), float(d["score_ci_high"].mean())


OVERALL = "Overall"  # the run's own score over all its samples: never a mean of the other columns


def _kind_order(kind: str) -> int:
    return {"subtask": 0, "aggregate": 1, "marginal": 2}.get(kind, 3)


def paper_tables(df: pd.DataFrame, name=lambda label: label) -> list[PaperTable]:
    """One budget table per (model, task); for tasks with subtasks, per budget: a per-subtask table
    (LongBench style: subtasks as columns, then the task's own aggregates such as avg_en, then Overall) and,
    apart, a table of the grid's marginals (NIAH's depth= / length=, a subtask at one length). "Overall" is
    the run's score over all its samples, not an average of the columns. `name` maps a method label to the
    name shown (paper names in `kvbench report --paper`)."""
    out = []
    models = df["model"].dropna().unique()
    for (model, task), g in df.groupby(["model", "task"], sort=False):
        suffix = f" ({model})" if len(models) > 1 else ""
        whole = g[g["subtask"] == ALL]
        full = whole[whole["method"] == "full"]
        comp = whole[whole["method"] != "full"]
        budgets = sorted(comp["budget_label"].unique(), key=_budget_key) or ["full"]
        rows, cis = [], []
        if len(full):
            rows.append(("Full cache", [_mean_score(full)] * len(budgets), True))
            cis.append([_mean_ci(full)] * len(budgets))
        for label, mg in comp.groupby("method_label", sort=False):
            rows.append((name(label), [_mean_score(mg[mg["budget_label"] == b]) for b in budgets], False))
            cis.append([_mean_ci(mg[mg["budget_label"] == b]) for b in budgets])
        out.append(PaperTable(f"{task}: score ×100 by KV budget (tokens per head){suffix}", budgets, rows, cis))

        kinds = dict(zip(g["subtask"], g["subtask_kind"])) if "subtask_kind" in g else {}
        subs = [s for s in g["subtask"].unique() if s != ALL]
        key = lambda s: (_kind_order(kinds.get(s, "subtask")), _natural_key(s))
        groups = [("per subtask", sorted((s for s in subs if kinds.get(s, "subtask") in ("subtask", "aggregate")),
                                         key=key)),
                  ("by grid slice (marginals)", sorted((s for s in subs if kinds.get(s) == "marginal"), key=key))]
        for b in budgets:
            sel = g[(g["budget_label"] == b) | (g["method"] == "full")]
            for what, cols in groups:
                real = [c for c in cols if kinds.get(c, "subtask") == "subtask"]
                if not cols or (what == "per subtask" and len(real) < 2):
                    continue  # one subtask is the run itself: its column would repeat Overall
                rows, cis = [], []
                for label, mg in sel.groupby("method_label", sort=False):
                    is_full = bool((mg["method"] == "full").all())
                    cells = [mg[mg["subtask"] == c] for c in cols] + [mg[mg["subtask"] == ALL]]
                    rows.append(("Full cache" if is_full else name(label), [_mean_score(c) for c in cells], is_full))
                    cis.append([_mean_ci(c) for c in cells])
                order = sorted(range(len(rows)), key=lambda i: not rows[i][2])  # full cache on top
                out.append(PaperTable(f"{task}: score ×100 {what}, budget {b}{suffix}", cols + [OVERALL],
                                      [rows[i] for i in order], [cis[i] for i in order],
                                      note=f"{OVERALL}: the run's score over all its samples (not a mean of the columns)"))
    return out


# ---------------------------------------------------------------- renderers
def to_markdown(t: PaperTable) -> str:
    cells, bold = t.cells(), t.bold()
    lines = [f"**{t.title}**", "", "| Method | " + " | ".join(t.columns) + " |",
             "|---|" + "---:|" * len(t.columns)]
    for (label, _, _), row, b in zip(t.rows, cells, bold):
        vals = [f"**{c}**" if bb else c for c, bb in zip(row, b)]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "×": r"$\times$",
        "–": "--", "−": "$-$", "±": r"$\pm$", "·": r"$\cdot$", "→": r"$\rightarrow$", "≥": r"$\geq$",
        "≤": r"$\leq$", "Δ": r"$\Delta$"}


def tex_escape(s: str) -> str:
    """LaTeX-safe text; characters outside ASCII without a LaTeX spelling here become "?" (pdflatex stops on
    a Unicode character its fonts lack)."""
    return "".join(_TEX.get(c, c if ord(c) < 128 else "?") for c in str(s))


def _ci_cell(cell: str, ci, style: str) -> str:
    """A LaTeX cell with its CI: "v (lo–hi)" (paren) or "v ± half-width" (pm); the value alone without a CI."""
    if style == "none" or ci is None or cell == "–" or _nan(ci[0]) or _nan(ci[1]):
        return tex_escape(cell)
    if style == "pm":
        return tex_escape(cell) + rf"{{\scriptsize$\pm${(ci[1] - ci[0]) * 50:.{DIGITS}f}}}"
    return tex_escape(cell) + rf"{{\scriptsize~({ci[0] * 100:.{DIGITS}f}--{ci[1] * 100:.{DIGITS}f})}}"


def to_latex(t: PaperTable, ci_style: str = "none") -> str:
    """A booktabs table; ci_style "paren" or "pm" adds each cell's bootstrap 95% CI (in parentheses, or ± its
    half-width)."""
    cells, bold = t.cells(), t.bold()
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * len(t.columns) + "}", r"\toprule",
             "Method & " + " & ".join(tex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    for i, ((label, _, full), row, b) in enumerate(zip(t.rows, cells, bold)):
        cis = t.ci[i] if t.ci else [None] * len(row)
        vals = [_ci_cell(c, ci, ci_style) for c, ci in zip(row, cis)]
        vals = [rf"\textbf{{{v}}}" if bb else v for v, bb in zip(vals, b)]
        lines.append(tex_escape(label) + " & " + " & ".join(vals) + r" \\")
        if full and i + 1 < len(t.rows) and not t.rows[i + 1][2]:
            lines.append(r"\midrule")  # rule between the reference row and the compressed methods
    cap = t.title + (f". {t.note}" if t.note else "") + (". 95% bootstrap CI " + (
        "in parentheses" if ci_style == "paren" else "as ± half-width") if ci_style in ("paren", "pm") else "")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{tex_escape(cap)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(t: PaperTable) -> str:
    cells, bold = t.cells(), t.bold()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["Method"] + t.columns)
    body = []
    for (label, _, full), row, b in zip(t.rows, cells, bold):
        tds = "".join(f"<td>{'<b>' + c + '</b>' if bb else c}</td>" for c, bb in zip(row, b))
        cls = ' class="full"' if full else ""
        body.append(f"<tr{cls}><th>{html.escape(label)}</th>{tds}</tr>")
    note = f"<br><small>{html.escape(t.note)}</small>" if t.note else ""
    return (f"<table class=\"paper\"><caption>{html.escape(t.title)}{note}</caption>"
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


def unique_rows(f: pd.DataFrame) -> pd.DataFrame:
    """Formatted rows, each shown once (repeated runs of one cell that read the same are one row)."""
    return f.drop_duplicates(ignore_index=True)


def write_tables(df: pd.DataFrame, out_dir, extra_md: list[str] | None = None,
                 ci_style: str = "none") -> list[PaperTable]:
    """table.csv (raw tidy table, scores in [0,1]), table.md, table.tex; returns the paper tables.
    `extra_md`: sections appended to table.md (the published-vs-ours table of a preset)."""
    from pathlib import Path
    out_dir = Path(out_dir)
    df.to_csv(out_dir / "table.csv", index=False)
    tables = paper_tables(df)
    md = ["# kvbench results", ""] + [to_markdown(t) for t in tables] + list(extra_md or [])
    md += ["## All runs", "", df_to_markdown(unique_rows(formatted(df[df["subtask"] == ALL]))),
           "## Per-subtask rows", "", df_to_markdown(unique_rows(formatted(df[df["subtask"] != ALL])))]
    (out_dir / "table.md").write_text("\n".join(md))
    tex = ["% kvbench results; needs \\usepackage{booktabs}", ""] + [to_latex(t, ci_style) for t in tables]
    (out_dir / "table.tex").write_text("\n".join(tex))
    return tables


def _natural_key(name: str):
    """"depth=25" before "depth=100": numbers inside subtask names compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]
