"""Log one finished run to Weights & Biases: config, summary metrics, the per-sample table, figures.

Offline by default: `WANDB_MODE` is respected, "offline" when unset, so nothing leaves the machine
unless asked (`WANDB_MODE=online`, then `wandb sync` also works on offline runs later).
`cfg` is the run's resolved config; its optional `wandb` section may set project, entity, group, tags.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .load import Run, _num, find_runs, read_records


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError("wandb is not installed: pip install wandb (or pip install 'kvbench[wandb]')") from None
    return wandb


def _cell(v):
    """wandb.Table cells must be scalars: lists and dicts go in as JSON text."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, ensure_ascii=False)


def records_table(records: list[dict]) -> tuple[list[str], list[list]]:
    """Columns and rows of the per-sample table, `meta` flattened into `meta.<key>` columns."""
    cols: list[str] = []
    for r in records:
        for k in r:
            if k != "meta" and k not in cols:
                cols.append(k)
    meta_cols = sorted({k for r in records for k in (r.get("meta") or {})})
    rows = [[_cell(r.get(k)) for k in cols] + [_cell((r.get("meta") or {}).get(k)) for k in meta_cols]
            for r in records]
    return cols + [f"meta.{k}" for k in meta_cols], rows


def summary_metrics(summary: dict) -> dict[str, float]:
    """Numeric summary fields and `extra` scores (finite numbers only)."""
    out = {}
    for k, v in list(summary.items()) + list((summary.get("extra") or {}).items()):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def run_figures(run: Run, out_dir: Path) -> list[Path]:
    """Per-run figures: the NIAH heatmap (niah runs) and per-subtask scores (tasks with subtasks)."""
    import matplotlib.pyplot as plt

    from .load import is_niah_run
    from .plots import STYLE, Figures, niah_grid, plot_niah
    figs = Figures(out_dir)
    s = run.summary
    with plt.rc_context(STYLE):
        if is_niah_run(run):
            grid = niah_grid(run.records)
            if not grid.empty:
                plot_niah(figs, grid, f"{s.get('task')}: {s.get('method')} @ {s.get('budget')}", "niah")
        subs = {k.split("/", 1)[1]: _num(v) for k, v in (s.get("extra") or {}).items() if k.startswith("score/")}
        if subs:
            fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(subs) + 2), 3.2))
            ax.bar(range(len(subs)), [v * 100 for v in subs.values()], color="#4c78a8")
            ax.set_xticks(range(len(subs)), list(subs), rotation=30, ha="right")
            ax.set_ylabel("score ×100")
            ax.set_title(f"{s.get('task')}: {s.get('method')} @ {s.get('budget')}")
            figs.save(fig, "subtasks")
    return [figs.dir / f"{n}.png" for n in figs.names]


def log_run(run_dir: Path, cfg: dict):
    """Log the run in `run_dir` (summary.json + records.jsonl) to W&B; returns the wandb run's local dir."""
    wandb = _wandb()
    run_dir = Path(run_dir)
    found = [r for r in find_runs(run_dir) if r.path == run_dir]
    if not found:
        raise ValueError(f"run_dir={str(run_dir)!r} has no summary.json; allowed: a finished run directory")
    run = found[0]
    run._records = read_records(run_dir / "records.jsonl")
    s = run.summary
    wcfg = dict((cfg or {}).get("wandb") or {})
    init = dict(project=wcfg.get("project", "kvbench"), entity=wcfg.get("entity"), group=wcfg.get("group"),
                tags=wcfg.get("tags"), name=s.get("run_id") or run_dir.name, config=cfg,
                mode=os.environ.get("WANDB_MODE") or "offline", reinit="finish_previous")
    if not os.environ.get("WANDB_DIR"):
        init["dir"] = str(run_dir)  # keep the offline files next to the run
    wrun = wandb.init(**{k: v for k, v in init.items() if v is not None})
    try:
        metrics = summary_metrics(s)
        cols, rows = records_table(run.records)
        with tempfile.TemporaryDirectory() as tmp:
            images = {f"figures/{p.stem}": wandb.Image(str(p)) for p in run_figures(run, Path(tmp))}
            wrun.log({**metrics, "samples": wandb.Table(columns=cols, data=rows), **images})
        wrun.summary.update(metrics)
        local = Path(wrun.dir)
    finally:
        wrun.finish()
    return local
