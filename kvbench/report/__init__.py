"""`kvbench report` (tables, figures, dashboard), `kvbench compare` (regression gate), a progress bar.

    kvbench report RESULTS_DIR [--out reports/NAME] [--title TEXT] [--no-plots] [--experiment NAME]
                               [--paper [--ci paren|pm|none]] [--gpu NAME|mem_gb=N,bw_tbs=N ...] [--gpu-mem-util F]
    kvbench history DIR... [--out reports/history] [--baseline DIR] [--tolerance POINTS]
    kvbench compare BASELINE_DIR CURRENT_DIR [--tolerance POINTS] [--ci] [--out summary.md]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def progress(iterable, total: int | None = None, desc: str | None = None):
    """A tqdm progress bar on stderr, silent when stderr is not a terminal (logs, CI, Hydra jobs)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)


def report_main(argv: list[str]) -> int:
    from .load import find_runs, load_table
    p = argparse.ArgumentParser(prog="kvbench report",
                                description="Aggregate a results dir into tables, figures and a dashboard.")
    p.add_argument("results_dir", type=Path)
    p.add_argument("--out", type=Path, help="output dir (default: reports/<basename of RESULTS_DIR>)")
    p.add_argument("--title", default=None, help="dashboard title")
    p.add_argument("--no-plots", action="store_true", help="tables only (faster)")
    p.add_argument("--experiment", default=None,
                   help="compare with this preset's published numbers (default: the preset whose sweep this is)")
    p.add_argument("--paper", action="store_true",
                   help="also write <out>/paper/: figures/*.pdf (column sizes, fonts embedded), tables/*.tex, main.tex")
    p.add_argument("--ci", choices=["none", "paren", "pm"], default="paren",
                   help="LaTeX tables of --paper: each score's 95%% CI in parentheses (paren), as ± (pm), or none")
    p.add_argument("--gpu", action="append", metavar="NAME|mem_gb=N,bw_tbs=N[,name=NAME]",
                   help="capacity tables for this GPU (repeatable; default h100-80gb): h100-80gb, h200-141gb, "
                        "a100-80gb, a100-40gb, l40s-48gb, or a custom card (mem_gib= for GiB)")
    p.add_argument("--gpu-mem-util", type=float, default=None,
                   help="fraction of the GPU's memory weights and KV may use (default 0.9, as vLLM's "
                        "gpu_memory_utilization)")
    a = p.parse_args(argv)
    from .capacity import DEFAULT_GPU, MEM_UTIL, capacity_markdown, capacity_tables, parse_gpu
    try:
        gpus = [parse_gpu(g) for g in a.gpu or [DEFAULT_GPU]]
    except ValueError as e:
        print(f"kvbench report: {e}", file=sys.stderr)
        return 2
    mem_util = MEM_UTIL if a.gpu_mem_util is None else a.gpu_mem_util
    if not 0 < mem_util <= 1:
        print(f"kvbench report: --gpu-mem-util {a.gpu_mem_util} is not a fraction; allowed: 0 < F <= 1",
              file=sys.stderr)
        return 2
    if not a.results_dir.is_dir():
        print(f"kvbench report: results dir {a.results_dir} does not exist", file=sys.stderr)
        return 2
    runs = find_runs(a.results_dir)
    if not runs:
        print(f"kvbench report: results dir {a.results_dir} has no runs (no summary.json below it)", file=sys.stderr)
        return 2
    from .experiments import PresetError, find_preset_for, load_preset, published_markdown, published_rows, \
        published_text
    try:
        preset = load_preset(a.experiment) if a.experiment else find_preset_for(runs)
    except PresetError as e:
        print(f"kvbench report: {e}", file=sys.stderr)
        return 2
    name = a.results_dir.resolve().name
    out = a.out or Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)

    from .dashboard import write_dashboard
    from .tables import write_tables
    df = load_table(runs)
    pub = published_rows(preset, df) if preset else []
    extra_md = [published_markdown(preset, pub)] if preset else []
    if preset:
        from .experiments import published_latex
        (out / "published.md").write_text(extra_md[0])
        (out / "published.tex").write_text(published_latex(preset, pub) if pub else "% no published values\n")
    capacity, why_not = capacity_tables(df, runs, gpus, mem_util)
    for line in why_not:
        print(f"kvbench report: {line}", file=sys.stderr)
    capacity_md = capacity_markdown(capacity)
    (out / "capacity.md").write_text(capacity_md)
    tables = write_tables(df, out, extra_md + [capacity_md])
    figures = []
    if not a.no_plots:
        from .plots import make_plots
        figures = make_plots(df, runs, out, pub, preset.title if preset else "",
                             source_of(preset))
    html = write_dashboard(df, tables + capacity, figures, out, source=str(a.results_dir),
                           title=a.title or f"kvbench: {name}", runs=runs, preset=preset, published=pub)
    if preset:
        print(published_text(preset, pub))
    paper_files = []
    if a.paper:
        from .paper import write_paper
        paper_files = write_paper(df, runs, out / "paper", pub, preset, a.ci)
    whole = df[df["subtask"] == "all"]
    n_bad = int((whole["status"] != "ok").sum())
    print(f"{len(whole)} runs ({n_bad} not ok), {len(figures)} figures -> {out}/ "
          f"(table.csv, table.md, table.tex, capacity.md, figures/, {html.name}"
          f"{', published.md' if preset else ''}{', paper/ (' + str(len(paper_files)) + ' files)' if a.paper else ''})")
    return 0


def source_of(preset) -> str:
    if preset is None:
        return ""
    from .experiments import source_line
    return source_line(preset)


def compare_main(argv: list[str]) -> int:
    from .compare import compare_main as _compare
    return _compare(argv)


__all__ = ["report_main", "compare_main", "progress"]
