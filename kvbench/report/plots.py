"""Paper figures with matplotlib (Agg): score vs budget, score vs KV memory (Pareto front), NIAH
depth × length heatmaps, TTFT / decode-latency bars, per-subtask grouped bars. Each is saved as PNG and
PDF under `<out>/figures/`, in one style, with one fixed colour per method across all figures.

The NIAH heatmap follows the "needle in a haystack" pressure test (G. Kamradt, 2023) and the papers
that reuse it: context length on x, needle depth on y, a red → yellow → green colour scale.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from .load import ALL, Run, is_niah_run  # noqa: E402

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight", "font.size": 10,
    "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8, "axes.grid": True,
    "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    # TrueType fonts embedded in PDFs (Type 42), never Type 3 bitmaps: what publishers' checkers ask for
    "pdf.fonttype": 42, "ps.fonttype": 42,
}
# `kvbench report --paper`: sizes of a two-column paper (ACL/NeurIPS/ICML: a column is ~3.3 in, the page ~6.9 in)
PAPER_STYLE = {**STYLE, "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
               "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.2, "lines.markersize": 4,
               # the PDF is exactly one column or the page wide (no tight crop): \includegraphics keeps the font
               # sizes as set here; constrained layout keeps labels and the legend inside that size
               "savefig.bbox": None, "figure.constrained_layout.use": True}
ONE_COLUMN_IN, TWO_COLUMN_IN = 3.3, 6.9
NIAH_CMAP = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
FULL_COLOR = "black"
# Okabe & Ito's colour-blind-safe palette (2008), then Paul Tol's "muted" for more methods. Methods the papers
# compare most keep the same colour in every report (and every figure of a report); others follow by name.
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442"]
TOL_MUTED = ["#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499"]
PALETTE = OKABE_ITO + TOL_MUTED
PREFERRED = ["snapkv", "pyramidkv", "streaming_llm", "h2o", "adakv", "tova", "knorm", "random"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*", "d", "8", "H", "1"]
# Method names as the papers write them (`kvbench report --paper`).
PAPER_NAMES = {"full": "Full cache", "snapkv": "SnapKV", "pyramidkv": "PyramidKV", "h2o": "H2O",
               "streaming_llm": "StreamingLLM", "adakv": "AdaKV", "tova": "TOVA", "knorm": "K-norm",
               "random": "Random", "recent": "Recent", "cake": "CAKE", "windowkv": "WindowKV",
               "compresskv": "CompressKV", "corm": "CORM", "lacache": "LaCache", "d2o": "D2O", "ems": "EMS",
               "duoattention": "DuoAttention", "razorattention": "RazorAttention", "fastgen": "FastGen"}


def paper_name(label: str) -> str:
    """"snapkv" -> "SnapKV"; "snapkv (q-aware)" -> "SnapKV (q-aware)"; unknown names unchanged."""
    base, sep, rest = str(label).partition(" ")
    return PAPER_NAMES.get(base, base) + (sep + rest if sep else "")


_MODE = {"paper": False, "name": str}  # set by make_plots


def _size(kind: str, default: tuple[float, float]) -> tuple[float, float]:
    """Figure size: the screen default, or in paper mode one column (`one`) or the page width (`two`)."""
    if not _MODE["paper"]:
        return default
    return {"one": (ONE_COLUMN_IN, 2.3), "two": (TWO_COLUMN_IN, 2.4)}[kind]


def _show(label: str) -> str:
    return "Full cache" if label == "full" else _MODE["name"](label)


def _legend(ax) -> None:
    """Legend outside the axes (right of them; below them at paper sizes), so it never hides data."""
    if _MODE["paper"]:
        ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False,
                         handlelength=1.5, columnspacing=1.0)
    else:
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def slug(s) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(s)).strip("_")


def _base(label: str) -> str:
    return str(label).split(" ", 1)[0]


def method_colors(labels) -> dict[str, str]:
    """One colour per method label, colour-blind safe: the methods papers compare most have fixed colours
    (PREFERRED, in every report), the others follow by name; a method run both ways (q-aware / q-agnostic)
    keeps its colour (and differs by marker); the full cache is black."""
    labels = sorted(set(map(str, labels)) - {"full"})
    colour = {b: PALETTE[i] for i, b in enumerate(PREFERRED)}
    others = sorted({_base(l) for l in labels} - set(PREFERRED) - {"full"})
    colour.update({b: PALETTE[(len(PREFERRED) + i) % len(PALETTE)] for i, b in enumerate(others)})
    colour["full"] = FULL_COLOR  # also "full (q-aware)" / "full (q-agnostic)" when the full cache ran both ways
    out = {l: colour[_base(l)] for l in labels}
    out["full"] = FULL_COLOR
    return out


def method_markers(labels) -> dict[str, str]:
    """One marker shape per method label (so methods that overlap stay apart in grey print too)."""
    labels = sorted(set(map(str, labels)) - {"full"}, key=lambda l: (PREFERRED.index(_base(l))
                    if _base(l) in PREFERRED else len(PREFERRED), l))
    out = {l: MARKERS[i % len(MARKERS)] for i, l in enumerate(labels)}
    out["full"] = "*"
    return out


class Figures:
    """Saves figures as `<dir>/<name>.<ext>` (PNG for screens and PDF by default; PDF only for a paper) and
    remembers the names in order."""

    def __init__(self, out_dir: Path, sub: str = "figures", exts: tuple[str, ...] = ("png", "pdf")):
        self.dir = Path(out_dir) / sub
        self.dir.mkdir(parents=True, exist_ok=True)
        self.exts = exts
        self.names: list[str] = []

    def save(self, fig, name: str) -> None:
        for ext in self.exts:
            # no creation date in PDFs: the same results give byte-identical figures
            fig.savefig(self.dir / f"{name}.{ext}", metadata={"CreationDate": None} if ext == "pdf" else None)
        plt.close(fig)
        self.names.append(name)


def _numeric_budgets(g: pd.DataFrame) -> pd.DataFrame:
    return g[(g["method"] != "full") & g["budget"].notna() & g["score"].notna()]


def _budget_axis(ax, budgets) -> None:
    budgets = sorted(budgets)
    if len(budgets) > 1 and min(budgets) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(int(b)) if float(b).is_integer() else str(b) for b in budgets])
    ax.minorticks_off()


def plot_score_vs_budget(fig_s: Figures, g: pd.DataFrame, colors, markers, title: str, name: str) -> None:
    comp = _numeric_budgets(g)
    if comp.empty:
        return
    fig, ax = plt.subplots(figsize=_size("one", (5, 3.5)))
    full = g[g["method"] == "full"]["score"].dropna()
    if len(full):
        ax.axhline(full.mean() * 100, color=FULL_COLOR, ls="--", lw=1.2, label="Full cache")
    for label, mg in comp.groupby("method_label", sort=False):
        m = mg.groupby("budget")[["score", "score_ci_low", "score_ci_high"]].mean().sort_index()
        x = m.index.to_numpy(dtype=float)
        ax.plot(x, m["score"] * 100, marker=markers[label], ms=4, color=colors[label], label=_show(label))
        if m["score_ci_low"].notna().any():
            ax.fill_between(x, m["score_ci_low"] * 100, m["score_ci_high"] * 100, color=colors[label], alpha=0.15, lw=0)
    _budget_axis(ax, comp["budget"].unique())
    ax.set_xlabel("KV budget (tokens per head per layer)")
    ax.set_ylabel("score ×100")
    ax.set_title(title)
    _legend(ax)
    fig_s.save(fig, name)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with less or equal memory and higher or equal score
    (memory ascending)."""
    front, best = [], -math.inf
    for mem, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((mem, score))
            best = score
    return front


DODGE = 0.03  # score-vs-memory: each method's points moved by ±3% per step on the (log) memory axis


def dodge_factors(labels: list[str]) -> dict[str, float]:
    """Multiplicative x offsets, one per compressed method, symmetric around 1: methods with the same memory
    and score (snapkv exactly under streaming_llm at one budget) are drawn side by side, not on top of each
    other. The Pareto front is computed from the true values."""
    labels = [l for l in labels if l != "full"]
    n = len(labels)
    return {l: (1 + DODGE) ** (i - (n - 1) / 2) for i, l in enumerate(labels)} | {"full": 1.0}


def plot_pareto(fig_s: Figures, g: pd.DataFrame, colors, markers, title: str, name: str) -> None:
    # memory axis: the most KV bytes a query held at any point (prefill, question, decoding), not only the
    # size right after compression (a prefill-only method keeps growing while it decodes); older runs
    # without it fall back to kv_bytes
    g = g.assign(kv_bytes=g["kv_bytes_held_max"].where(g["kv_bytes_held_max"].notna(), g["kv_bytes"])
                 if "kv_bytes_held_max" in g else g["kv_bytes"])
    d = g[g["score"].notna() & g["kv_bytes"].notna() & (g["kv_bytes"] > 0)]
    if d.empty:
        return
    fig, ax = plt.subplots(figsize=_size("one", (5, 3.5)))
    dodge = dodge_factors(list(dict.fromkeys(d["method_label"])))
    for k, (label, mg) in enumerate(d.groupby("method_label", sort=False)):
        full = (mg["method"] == "full").all()
        x = mg["kv_bytes"] / 2**20 * dodge[label]
        # hollow markers: one method's point never hides another's drawn at the same place
        ax.scatter(x, mg["score"] * 100, s=70 if full else 30, marker=markers[label], facecolors="none"
                   if not full else colors[label], edgecolors=colors[label], linewidths=1.2,
                   label=_show(label), zorder=3)
        if not _MODE["paper"]:
            for xi, (_, r) in zip(x, mg.iterrows()):
                if not full:
                    # labels of methods at the same place go above / below their point in turn
                    ax.annotate(r["budget_label"], (xi, r["score"] * 100), fontsize=7, color=colors[label],
                                xytext=(3, 3) if k % 2 else (3, -10), textcoords="offset points")
    front = pareto_front(list(zip(d["kv_bytes"] / 2**20, d["score"] * 100)))
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="gray", lw=1, ls=":", label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
    if _MODE["paper"]:  # a column is narrow: the offset is said in the caption of main.tex
        ax.set_xlabel("max KV cache held (MiB)")
    else:
        ax.set_xlabel(f"max KV cache held (MiB, mean per query; methods offset ±{DODGE * 100:g}% apart)"
                      if len(dodge) > 2 else "max KV cache held (MiB, mean per query)")
    ax.set_ylabel("score ×100")
    ax.set_title(title)
    _legend(ax)
    fig_s.save(fig, name)


def _fmt_len(v) -> str:
    v = float(v)
    return f"{v / 1000:g}K" if v >= 1000 else f"{v:g}"


def niah_grid(records: list[dict]) -> pd.DataFrame:
    """Mean score ×100 of ok records, depth (%) as rows × context length as columns."""
    rows = [{"depth": r["meta"]["depth"], "length": r["meta"]["length"], "score": float(r["score"])}
            for r in records if r.get("status", "ok") == "ok" and r.get("score") is not None
            and "depth" in (r.get("meta") or {}) and "length" in (r.get("meta") or {})]
    if not rows:
        return pd.DataFrame()
    d = pd.DataFrame(rows)
    if d["depth"].max() <= 1:  # depth given as a fraction
        d["depth"] = d["depth"] * 100
    return d.pivot_table(index="depth", columns="length", values="score", aggfunc="mean").sort_index() * 100


def plot_niah(fig_s: Figures, grid: pd.DataFrame, title: str, name: str) -> None:
    size = _size("one", (max(4.0, 0.6 * grid.shape[1] + 2), max(3.0, 0.35 * grid.shape[0] + 1.5)))
    fig, ax = plt.subplots(figsize=size)
    with plt.rc_context({"axes.grid": False}):
        im = ax.imshow(grid.to_numpy(), cmap=NIAH_CMAP, vmin=0, vmax=100, aspect="auto")
    ax.grid(False)
    ax.set_xticks(range(grid.shape[1]), [_fmt_len(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{d:g}" for d in grid.index])
    if grid.size <= 200:  # cell values stay readable on small grids
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(f"{title}\nmean {np.nanmean(grid.to_numpy()):.1f}")
    fig.colorbar(im, ax=ax, label="score ×100")
    fig_s.save(fig, name)


def plot_latency(fig_s: Figures, g: pd.DataFrame, colors, title: str, name: str) -> None:
    g = g[g[["ttft_ms", "decode_ms_per_token"]].notna().any(axis=1)]  # failed runs have no timings
    if g.empty:
        return
    fig, axes = plt.subplots(1, 2, figsize=_size("two", (9, 3.5)))
    labels = ["Full cache" if r.method == "full" else f"{_show(r.method_label)} @ {r.budget_label}" for r in g.itertuples()]
    for ax, col, ylab in [(axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "decode_ms_per_token", "decode (ms / token)")]:
        ax.bar(range(len(g)), g[col].fillna(0), color=[colors[m] for m in g["method_label"]])
        ax.set_xticks(range(len(g)), labels, fontsize=7 if not _MODE["paper"] else 6, rotation=45, ha="right")
        ax.set_ylabel(ylab)
        ax.grid(axis="x", visible=False)
    fig.suptitle(title)
    if not _MODE["paper"]:
        fig.tight_layout()
    fig_s.save(fig, name)


def plot_subtasks(fig_s: Figures, g: pd.DataFrame, colors, subs: list[str], title: str, name: str) -> None:
    methods = list(dict.fromkeys(g["method_label"]))
    fig, ax = plt.subplots(figsize=_size("two", (max(5.0, 0.9 * len(subs) * max(1, len(methods)) / 2 + 2), 3.5)))
    w = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        mg = g[g["method_label"] == m]
        vals = [mg[mg["subtask"] == s]["score"].mean() * 100 for s in subs]
        ax.bar(np.arange(len(subs)) + (k - (len(methods) - 1) / 2) * w, vals, w, color=colors[m], label=_show(m))
    ax.set_xticks(range(len(subs)), subs, rotation=30, ha="right")
    ax.set_ylabel("score ×100")
    ax.set_title(title)
    ax.grid(axis="x", visible=False)
    _legend(ax)
    fig_s.save(fig, name)


def plot_published(fig_s: Figures, g: pd.DataFrame, rows: list[dict], colors, markers, title: str, name: str,
                   source: str = "") -> None:
    """Score vs budget per subtask, the papers' layout: our runs as lines with filled markers, the published
    values as hollow markers of the same colour and shape on the same axes; the full cache as a horizontal
    line (ours dashed, published dotted)."""
    subs = list(dict.fromkeys(r["subtask"] for r in rows))
    ours = {r["subtask"] for r in rows if not math.isnan(r["ours"])}  # subtasks compared with a run of ours
    subs = [s for s in subs if s in ours] or subs  # a small run: only the panels it can be compared on
    if not subs:
        return
    tasks = {r.get("task") for r in rows} - {None}
    if tasks:  # the preset's task only (a report may hold others)
        g = g[g["task"].isin(tasks)]
    ncol = min(4, len(subs))
    nrow = math.ceil(len(subs) / ncol)
    w = TWO_COLUMN_IN if _MODE["paper"] else 3.2 * ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(w, (1.7 if _MODE["paper"] else 2.6) * nrow + 0.6),
                             squeeze=False)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None} |
                     set(_numeric_budgets(g)["budget"].unique()))
    handles = {}
    for ax, sub in zip(axes.flat, subs):
        sg = g[g["subtask"] == sub]
        if sub == "avg" and sg.empty:
            sg = g[g["subtask"] == ALL]
        if sub not in ours:  # e.g. our avg_en over fewer tasks than the paper's: not drawn beside it
            sg = sg.iloc[0:0]
        full = sg[sg["method"] == "full"]["score"].dropna()
        if len(full):
            handles["Full cache (ours)"] = ax.axhline(full.mean() * 100, color=FULL_COLOR, ls="--", lw=1)
        for label, mg in _numeric_budgets(sg).groupby("method_label", sort=False):
            m = mg.groupby("budget")["score"].mean().sort_index()
            (h,) = ax.plot(m.index.to_numpy(dtype=float), m.to_numpy() * 100, marker=markers[label], ms=3.5,
                           color=colors[label], lw=1)
            handles[f"{_show(label)} (ours)"] = h
        for r in rows:
            if r["subtask"] != sub:
                continue
            c = colors.get(r["method"], FULL_COLOR)
            if r["method"] == "full":
                handles["Full cache (published)"] = ax.axhline(r["published"], color=FULL_COLOR, ls=":", lw=1)
            elif r["budget"] is not None:
                h = ax.scatter([r["budget"]], [r["published"]], marker=markers.get(r["method"], "o"), s=28,
                               facecolors="none", edgecolors=c, linewidths=1.1, zorder=4)
                handles[f"{_show(r['method'])} (published)"] = h
        if budgets:
            _budget_axis(ax, budgets)
        ax.set_title(sub)
        ax.tick_params(axis="x", labelrotation=45)
    for ax in axes.flat[len(subs):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("score ×100")
    for ax in axes[-1, :]:
        ax.set_xlabel("KV budget")
    import textwrap
    fig.suptitle(title + (f"\n{textwrap.fill(source, 40 * ncol)}" if source and not _MODE["paper"] else ""),
                 fontsize=9 if _MODE["paper"] else 11)
    if _MODE["paper"]:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=3, frameon=False)
    else:
        fig.tight_layout()
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=4, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    fig_s.save(fig, name)


def make_plots(df: pd.DataFrame, runs: list[Run], out_dir: Path, published: list[dict] | None = None,
               published_title: str = "", published_source: str = "", paper: bool = False,
               sub: str = "figures") -> list[str]:
    """Every figure for the report; returns the figure names (files are <out>/<sub>/<name>.png|pdf). With
    `published` (rows of experiments.published_rows) the published points are drawn too; `paper`: PDF only,
    column sizes, paper method names."""
    fig_s = Figures(out_dir, sub, ("pdf",) if paper else ("png", "pdf"))
    if df.empty:
        return []
    _MODE.update(paper=paper, name=paper_name if paper else str)
    colors = method_colors(df["method_label"])
    markers = method_markers(df["method_label"])
    for r in published or []:  # published methods absent from our runs still get their colour and marker
        colors.setdefault(r["method"], method_colors(list(colors) + [r["method"]])[r["method"]])
        markers.setdefault(r["method"], "o")
    multi_model = df["model"].nunique() > 1
    try:
        with plt.rc_context(PAPER_STYLE if paper else STYLE):
            _all_plots(fig_s, df, runs, colors, markers, multi_model)
            if published:
                plot_published(fig_s, df, published, colors, markers, published_title,
                               f"published__{slug(published_title.split(':')[0] or 'preset')}", published_source)
    finally:
        _MODE.update(paper=False, name=str)
    return fig_s.names


def _all_plots(fig_s, df, runs, colors, markers, multi_model) -> None:
    for (model, task), g in df.groupby(["model", "task"], sort=False):
        pre = f"{slug(model)}__{slug(task)}" if multi_model else slug(task)
        tt = f"{task} ({model})" if multi_model else task
        whole = g[g["subtask"] == ALL]
        plot_score_vs_budget(fig_s, whole, colors, markers, tt, f"score_vs_budget__{pre}")
        plot_pareto(fig_s, whole, colors, markers, tt, f"pareto__{pre}")
        plot_latency(fig_s, whole, colors, tt, f"latency__{pre}")
        kinds = dict(zip(g["subtask"], g["subtask_kind"])) if "subtask_kind" in g else {}
        subs = [s for s in g["subtask"].unique() if s != ALL and kinds.get(s, "subtask") == "subtask"]
        if len(subs) > 1:  # one subtask is the run itself (score vs budget shows it)
            for b in [b for b in dict.fromkeys(g["budget_label"]) if b != "full"] or ["full"]:
                sel = g[(g["subtask"] != ALL) & ((g["budget_label"] == b) | (g["method"] == "full"))]
                plot_subtasks(fig_s, sel, colors, subs, f"{tt}, budget {b}", f"subtasks__{pre}__{slug(b)}")
    # NIAH heatmaps: one per (model, task, method, budget), repeated runs (seeds) pooled
    niah: dict[tuple, list[dict]] = {}
    runs_df = df[df["subtask"] == ALL].set_index("run_dir")
    for run in runs:
        if str(run.path) not in runs_df.index or not is_niah_run(run):
            continue
        r = runs_df.loc[str(run.path)]
        if isinstance(r, pd.DataFrame):
            r = r.iloc[0]
        niah.setdefault((r["model"], r["task"], r["method_label"], r["budget_label"]), []).extend(run.records)
    for (model, task, label, b), recs in niah.items():
        grid = niah_grid(recs)
        if grid.empty:
            continue
        pre = f"{slug(model)}__{slug(task)}" if multi_model else slug(task)
        ttl = "Full cache" if label == "full" else f"{_show(label)}, budget {b}"
        plot_niah(fig_s, grid, f"{task}: {ttl}", f"niah__{pre}__{slug(label)}__{slug(b)}")
