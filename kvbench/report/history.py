"""`kvbench history DIR...`: every gated metric across commits, on one self-contained HTML page.

    kvbench history results/ci/*/ [--out reports/history] [--baseline DIR] [--tolerance 1] [--ci] [--eps 1e-3]

Reads the summaries below every DIR (typically one results dir per commit: CI artifacts), groups the runs by
the git commit their summary records (`git_commit`, dated by `git_commit_date`, else by when the run
finished) and orders the commits by date. For every run (model · task · method @ budget, query mode) it draws
the score, the KV bytes and the decode FLOPs per token over the commits, and the timings (TTFT, decode
ms/token) apart for each device, since timings only compare on the same kind of machine. A commit is marked
failed where `kvbench compare` would have failed on it: against the commit before it (default) or against
`--baseline DIR` (the committed baseline CI gates on), with the same tolerance, CI and eps rules.
Writes `<out>/index.html` (figures embedded), `<out>/history.csv` (one row per commit × run × metric).
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .compare import check, entry, match
from .load import Run, find_runs

GATED = [("score", "score ×100", 100.0), ("kv_bytes", "KV MiB", 1 / 2**20),
         ("decode_flops_per_token", "decode GFLOPs / token", 1e-9)]
TIMINGS = [("ttft_ms", "TTFT ms"), ("decode_ms_per_token", "decode ms / token")]


@dataclass
class Commit:
    sha: str
    date: str           # ISO 8601 (commit date, else the latest finish time of its runs)
    dated_by: str       # "commit" or "run finish"
    runs: list[Run]
    failed: bool = False
    problems: list[str] = field(default_factory=list)
    against: str = ""   # what it was compared with
    bad: dict[str, set[str]] = field(default_factory=dict)  # run label -> gated metrics that failed there


def _commit_of(run: Run) -> str:
    return str(run.summary.get("git_commit") or "unknown")


def group_commits(runs: list[Run]) -> list[Commit]:
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(_commit_of(r), []).append(r)
    out = []
    for sha, rs in by.items():
        dates = Counter(r.summary.get("git_commit_date") for r in rs if r.summary.get("git_commit_date"))
        if dates:
            out.append(Commit(sha, dates.most_common(1)[0][0], "commit", rs))
        else:
            fin = max((str(r.summary.get("finished_at") or "") for r in rs), default="")
            out.append(Commit(sha, fin, "run finish", rs))
    return sorted(out, key=lambda c: (_parse(c.date), c.sha))


def _parse(date: str) -> dt.datetime:
    try:
        d = dt.datetime.fromisoformat(date.replace("Z", "+00:00"))
        return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)
    except (ValueError, AttributeError):
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def gate(commits: list[Commit], baseline: list[Run] | None, tolerance: float, use_ci: bool, eps: float) -> None:
    """Mark each commit where `kvbench compare` would fail: against the baseline runs if given, else against
    the previous commit (the first commit then has nothing to compare with)."""
    for i, c in enumerate(commits):
        base = baseline if baseline is not None else (commits[i - 1].runs if i else None)
        if base is None:
            c.against = "– (first commit)"
            continue
        c.against = "baseline" if baseline is not None else commits[i - 1].sha[:10]
        pairs, missing, _new = match([entry(r) for r in base], [entry(r) for r in c.runs])
        for b, cur in pairs:
            row = check(b, cur, tolerance, use_ci, eps)
            c.problems += [f"{cur.label}: {p}" for p in row.problems]
            for p in row.problems:
                metric = ("score" if p.startswith("score") else "kv_bytes" if p.startswith("KV bytes") else
                          "decode_flops_per_token" if p.startswith("decode FLOPs") else "status")
                c.bad.setdefault(cur.label, set()).add(metric)
        c.problems += [f"{m.label}: missing" for m in missing]
        c.failed = bool(c.problems)


def _device(run: Run) -> str:
    return str((run.summary.get("conditions") or {}).get("device") or "unknown device")


def series(commits: list[Commit]) -> dict[str, dict[str, list[float]]]:
    """metric -> run label (timings: + device) -> one value per commit (NaN where the commit lacks the run)."""
    out: dict[str, dict[str, list[float]]] = {}
    n = len(commits)
    for i, c in enumerate(commits):
        for run in c.runs:
            e = entry(run)
            for key, _, scale in GATED:
                v = e.scores["score"] if key == "score" else e.metrics.get(key, math.nan)
                out.setdefault(key, {}).setdefault(e.label, [math.nan] * n)[i] = v * scale
            for key, _ in TIMINGS:
                v = e.metrics.get(key, math.nan)
                out.setdefault(key, {}).setdefault(f"{e.label} [{_device(run)}]", [math.nan] * n)[i] = v
    return out


def _figure(commits: list[Commit], data: dict[str, list[float]], ylabel: str, title: str, metric: str = "") -> str:
    """One metric over the commits as a base64 PNG: a line per run, failed commits shaded red and marked, and
    a red cross on the point of each run that failed the gate on this metric there."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .plots import PALETTE, STYLE
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(commits) + 3), 3.2))
        x = list(range(len(commits)))
        for k, (label, ys) in enumerate(sorted(data.items())):
            ax.plot(x, ys, marker="o", ms=4, lw=1.2, color=PALETTE[k % len(PALETTE)], label=label)
        for i, c in enumerate(commits):
            for label, metrics in c.bad.items():
                if metric in metrics and label in data and data[label][i] == data[label][i]:
                    ax.scatter([i], [data[label][i]], marker="X", s=80, color="#c81e1e", zorder=5)
            if c.failed:
                ax.axvspan(i - 0.4, i + 0.4, color="#c81e1e", alpha=0.12, lw=0)
                ax.annotate("compare failed", (i, 1.0), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize=7, color="#c81e1e")
        ax.set_xticks(x, [f"{c.sha[:7]}\n{c.date[:10]}" for c in commits], fontsize=7)
        ax.set_xlim(-0.6, len(commits) - 0.4)
        ax.set_ylabel(ylabel)
        ax.set_title(title, pad=14)
        if len(data) <= 12:
            ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_csv(commits: list[Commit], data: dict, path: Path) -> None:
    import csv
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["commit", "date", "dated_by", "compare_failed", "metric", "run", "value"])
        for metric, runs in data.items():
            for label, ys in runs.items():
                for c, y in zip(commits, ys):
                    if not math.isnan(y):
                        w.writerow([c.sha, c.date, c.dated_by, c.failed, metric, label, f"{y:.6g}"])


FAILED_CELL = '<b class="err">FAILED</b>'


def render(commits: list[Commit], data: dict, dirs: list[str], gate_txt: str) -> str:
    e = html.escape
    figs = []
    for key, ylabel, _ in GATED:
        if data.get(key):
            figs.append((f"{ylabel} (gated)", _figure(commits, data[key], ylabel, f"{ylabel} per run", key)))
    for key, ylabel in TIMINGS:
        if data.get(key):
            figs.append((f"{ylabel} (reported, not gated; per device)",
                         _figure(commits, data[key], ylabel, f"{ylabel} per run and device")))
    rows = "".join(
        f"<tr class=\"{'bad' if c.failed else ''}\"><td><code>{e(c.sha[:10])}</code></td><td>{e(c.date)}</td>"
        f"<td>{e(c.dated_by)}</td><td>{len(c.runs)}</td><td>{e(c.against)}</td>"
        f"<td>{FAILED_CELL if c.failed else 'ok'}</td><td>{'<br>'.join(e(p) for p in c.problems) or '–'}</td></tr>"
        for c in commits)
    n_bad = sum(c.failed for c in commits)
    imgs = "".join(f"<h2>{e(t)}</h2><img alt=\"{e(t)}\" src=\"data:image/png;base64,{b}\">" for t, b in figs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvbench history</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222; background: #fafafa; }}
header {{ background: #1f2933; color: #fff; padding: 16px 28px; }} header h1 {{ margin: 0; font-size: 22px; }}
header p {{ margin: 4px 0 0; color: #cbd2d9; font-size: 13px; }} main {{ padding: 8px 28px 40px; }}
h2 {{ border-bottom: 2px solid #d9e2ec; padding-bottom: 4px; margin-top: 28px; font-size: 17px; }}
table {{ border-collapse: collapse; background: #fff; font-size: 13px; }}
th, td {{ border-bottom: 1px solid #e4e7eb; padding: 4px 10px; text-align: left; vertical-align: top; }}
tr.bad td {{ background: #fdecec; }} .err {{ color: #c81e1e; }} img {{ max-width: 100%; background: #fff; border: 1px solid #d9e2ec; }}
</style></head><body>
<header><h1>kvbench history: {len(commits)} commits, {n_bad} where compare failed</h1>
<p>{e(', '.join(dirs))} &middot; generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p></header>
<main>
<p>Gate (as <code>kvbench compare</code>): {e(gate_txt)}. Timings are reported per device, never gated.</p>
<h2>Commits</h2>
<table><thead><tr><th>commit</th><th>date</th><th>dated by</th><th>runs</th><th>compared with</th><th>compare</th>
<th>problems</th></tr></thead><tbody>{rows}</tbody></table>
{imgs}
</main></body></html>
"""


def history_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvbench history", description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="results dirs (e.g. one per commit, as CI artifacts)")
    p.add_argument("--out", type=Path, default=Path("reports/history"), help="output dir (default reports/history)")
    p.add_argument("--baseline", type=Path, help="gate every commit against this results dir (default: the commit before)")
    p.add_argument("--tolerance", type=float, default=1.0, help="allowed score drop in points ×100 (default 1)")
    p.add_argument("--ci", action="store_true", help="also fail when a score falls below the compared run's 95%% CI")
    p.add_argument("--eps", type=float, default=1e-3, help="allowed relative growth of KV bytes / FLOPs (default 1e-3)")
    a = p.parse_args(argv)
    if a.tolerance < 0 or a.eps < 0:
        print(f"kvbench history: --tolerance={a.tolerance} and --eps={a.eps} must be >= 0", file=sys.stderr)
        return 2
    runs: list[Run] = []
    for d in a.dirs:
        if not d.is_dir():
            print(f"kvbench history: {d} is not a directory", file=sys.stderr)
            return 2
        runs += find_runs(d)
    if not runs:
        print("kvbench history: no runs (no summary.json below the given dirs)", file=sys.stderr)
        return 2
    baseline = None
    if a.baseline is not None:
        if not a.baseline.is_dir() or not (baseline := find_runs(a.baseline)):
            print(f"kvbench history: baseline {a.baseline} has no runs", file=sys.stderr)
            return 2
    commits = group_commits(runs)
    gate(commits, baseline, a.tolerance, a.ci, a.eps)
    data = series(commits)
    a.out.mkdir(parents=True, exist_ok=True)
    gate_txt = (f"score drop > {a.tolerance:g} points{' or below the 95% CI' if a.ci else ''}, KV bytes or decode "
                f"FLOPs growth > {a.eps * 100:g}%, a run gone or no longer ok; against "
                + (f"the baseline {a.baseline}" if baseline is not None else "the commit before"))
    (a.out / "index.html").write_text(render(commits, data, [str(d) for d in a.dirs], gate_txt), encoding="utf-8")
    write_csv(commits, data, a.out / "history.csv")
    for c in commits:
        mark = "FAILED" if c.failed else "ok"
        print(f"{c.sha[:10]}  {c.date:<25}  {len(c.runs):>3} runs  {mark}"
              + (f"  ({'; '.join(c.problems[:3])}{' ...' if len(c.problems) > 3 else ''})" if c.problems else ""))
    print(f"{len(commits)} commits, {sum(c.failed for c in commits)} where compare failed -> {a.out}/index.html")
    return 0
