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
    "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "pdf.fonttype": 42,
}
NIAH_CMAP = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
FULL_COLOR = "black"


def _legend(ax) -> None:
    """Legend outside the axes on the right, so it never hides data."""
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def slug(s) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(s)).strip("_")


def method_colors(labels) -> dict[str, str]:
    """One colour per method label (sorted, tab10 then tab20), full cache in black."""
    names = sorted(l for l in set(labels) if l != "full")
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    out = {l: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, l in enumerate(names)}
    out["full"] = FULL_COLOR
    return out


class Figures:
    """Saves figures as `<out>/figures/<name>.{png,pdf}` and remembers the names in order."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []

    def save(self, fig, name: str) -> None:
        for ext in ("png", "pdf"):
            fig.savefig(self.dir / f"{name}.{ext}")
        plt.close(fig)
        self.names.append(name)


def _numeric_budgets(g: pd.DataFrame) -> pd.DataFrame:
    return g[(g["method"] != "full") & g["budget"].notna() & g["score"].notna()]


def plot_score_vs_budget(fig_s: Figures, g: pd.DataFrame, colors, title: str, name: str) -> None:
    comp = _numeric_budgets(g)
    if comp.empty:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    full = g[g["method"] == "full"]["score"].dropna()
    if len(full):
        ax.axhline(full.mean() * 100, color=FULL_COLOR, ls="--", lw=1.2, label="Full cache")
    for label, mg in comp.groupby("method_label", sort=False):
        m = mg.groupby("budget")[["score", "score_ci_low", "score_ci_high"]].mean().sort_index()
        x = m.index.to_numpy(dtype=float)
        ax.plot(x, m["score"] * 100, marker="o", ms=4, color=colors[label], label=label)
        if m["score_ci_low"].notna().any():
            ax.fill_between(x, m["score_ci_low"] * 100, m["score_ci_high"] * 100, color=colors[label], alpha=0.15, lw=0)
    budgets = sorted(comp["budget"].unique())
    if len(budgets) > 1 and min(budgets) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(int(b)) if float(b).is_integer() else str(b) for b in budgets])
    ax.minorticks_off()
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


def plot_pareto(fig_s: Figures, g: pd.DataFrame, colors, title: str, name: str) -> None:
    # memory axis: the most KV bytes a query held at any point (prefill, question, decoding), not only the
    # size right after compression (a prefill-only method keeps growing while it decodes); older runs
    # without it fall back to kv_bytes
    g = g.assign(kv_bytes=g["kv_bytes_held_max"].where(g["kv_bytes_held_max"].notna(), g["kv_bytes"])
                 if "kv_bytes_held_max" in g else g["kv_bytes"])
    d = g[g["score"].notna() & g["kv_bytes"].notna() & (g["kv_bytes"] > 0)]
    if d.empty:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, mg in d.groupby("method_label", sort=False):
        full = (mg["method"] == "full").all()
        ax.scatter(mg["kv_bytes"] / 2**20, mg["score"] * 100, color=colors[label], s=60 if full else 28,
                   marker="*" if full else "o", label="Full cache" if full else label, zorder=3)
        for _, r in mg.iterrows():
            if not full:
                ax.annotate(r["budget_label"], (r["kv_bytes"] / 2**20, r["score"] * 100), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    front = pareto_front(list(zip(d["kv_bytes"] / 2**20, d["score"] * 100)))
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="gray", lw=1, ls=":", label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
    ax.set_xlabel("max KV cache held (MiB, mean per query)")
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
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * grid.shape[1] + 2), max(3.0, 0.35 * grid.shape[0] + 1.5)))
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
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = ["full cache" if r.method == "full" else f"{r.method_label} @ {r.budget_label}" for r in g.itertuples()]
    for ax, col, ylab in [(axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "decode_ms_per_token", "decode (ms / token)")]:
        ax.bar(range(len(g)), g[col].fillna(0), color=[colors[m] for m in g["method_label"]])
        ax.set_xticks(range(len(g)), labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel(ylab)
        ax.grid(axis="x", visible=False)
    fig.suptitle(title)
    fig.tight_layout()
    fig_s.save(fig, name)


def plot_subtasks(fig_s: Figures, g: pd.DataFrame, colors, subs: list[str], title: str, name: str) -> None:
    methods = list(dict.fromkeys(g["method_label"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(subs) * max(1, len(methods)) / 2 + 2), 3.5))
    w = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        mg = g[g["method_label"] == m]
        vals = [mg[mg["subtask"] == s]["score"].mean() * 100 for s in subs]
        ax.bar(np.arange(len(subs)) + (k - (len(methods) - 1) / 2) * w, vals, w, color=colors[m],
               label="Full cache" if m == "full" else m)
    ax.set_xticks(range(len(subs)), subs, rotation=30, ha="right")
    ax.set_ylabel("score ×100")
    ax.set_title(title)
    ax.grid(axis="x", visible=False)
    _legend(ax)
    fig_s.save(fig, name)


def make_plots(df: pd.DataFrame, runs: list[Run], out_dir: Path) -> list[str]:
    """Every figure for the report; returns the figure names (files are figures/<name>.png|pdf)."""
    fig_s = Figures(out_dir)
    if df.empty:
        return []
    colors = method_colors(df["method_label"])
    multi_model = df["model"].nunique() > 1
    with plt.rc_context(STYLE):
        for (model, task), g in df.groupby(["model", "task"], sort=False):
            pre = f"{slug(model)}__{slug(task)}" if multi_model else slug(task)
            tt = f"{task} ({model})" if multi_model else task
            whole = g[g["subtask"] == ALL]
            plot_score_vs_budget(fig_s, whole, colors, tt, f"score_vs_budget__{pre}")
            plot_pareto(fig_s, whole, colors, tt, f"pareto__{pre}")
            plot_latency(fig_s, whole, colors, tt, f"latency__{pre}")
            subs = [s for s in g["subtask"].unique() if s != ALL]
            if subs:
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
            ttl = "Full cache" if label == "full" else f"{label}, budget {b}"
            plot_niah(fig_s, grid, f"{task}: {ttl}", f"niah__{pre}__{slug(label)}__{slug(b)}")
    return fig_s.names
