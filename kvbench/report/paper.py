r"""`kvbench report --paper`: what goes into a paper, in `<out>/paper/`:

    figures/<name>.pdf   vector, TrueType fonts embedded (pdf.fonttype 42), one-column (3.3 in) or page-wide
                         (6.9 in) sizes, colour-blind-safe palette with one colour and marker per method,
                         method names as the papers write them (SnapKV, PyramidKV, H2O, StreamingLLM, ...)
    tables/<name>.tex    booktabs tables, best compressed method in bold, 95% CI in parentheses or as ±
    main.tex             a two-column article that \input's every table and includes every figure; it compiles
                         with pdflatex (packages: booktabs, graphicx)
"""
from __future__ import annotations

import re
from pathlib import Path

from .plots import make_plots, paper_name
from .tables import paper_tables, tex_escape, to_latex

WIDE_FIGURES = ("latency", "subtasks", "published")


def _tex_name(name: str) -> str:
    r"""A file name LaTeX's \includegraphics/\input read without extra packages (no dots, no spaces)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name.replace(".", "p"))


def _wide_table(tex: str, n_cols: int) -> str:
    """Tables of many columns span both columns and are scaled to the page width."""
    if n_cols <= 6:
        return tex
    tex = tex.replace(r"\begin{table}[t]", r"\begin{table*}[t]").replace(r"\end{table}", r"\end{table*}")
    tex = tex.replace(r"\begin{tabular}", r"\resizebox{\textwidth}{!}{\begin{tabular}", 1)
    return tex.replace(r"\end{tabular}", r"\end{tabular}}", 1)


def _caption(name: str) -> str:
    text = name.replace("__", ": ").replace("_", " ")
    if name.startswith("pareto"):
        text += ". Score vs the most KV bytes a query held; methods drawn offset by a few percent on the x axis " \
                "so that equal points stay visible; dotted: the Pareto front"
    if name.startswith("published"):
        text += ". Lines with filled markers: ours; hollow markers (dotted line for the full cache): published"
    return text


def write_paper(df, runs, paper_dir: Path, published=None, preset=None, ci_style: str = "paren") -> list[Path]:
    paper_dir = Path(paper_dir)
    (paper_dir / "tables").mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    names = make_plots(df, runs, paper_dir, published or None, preset.title if preset else "",
                       "", paper=True, sub="figures")
    figs = []
    for n in names:
        src = paper_dir / "figures" / f"{n}.pdf"
        dst = paper_dir / "figures" / f"{_tex_name(n)}.pdf"
        if src != dst:
            src.replace(dst)
        figs.append((_tex_name(n), n))
        files.append(dst)
    tables = []
    for i, t in enumerate(paper_tables(df, name=paper_name)):
        tname = f"table{i + 1:02d}"
        (paper_dir / "tables" / f"{tname}.tex").write_text(_wide_table(to_latex(t, ci_style), len(t.columns) + 1))
        tables.append(tname)
        files.append(paper_dir / "tables" / f"{tname}.tex")
    if preset is not None and published:
        from .experiments import published_latex
        (paper_dir / "tables" / "published.tex").write_text(_wide_table(published_latex(preset, published), 8))
        tables.append("published")
        files.append(paper_dir / "tables" / "published.tex")
    body = [r"\documentclass[10pt,twocolumn]{article}", r"\usepackage[T1]{fontenc}", r"\usepackage{booktabs}",
            r"\usepackage{graphicx}", r"\begin{document}", r"\title{kvbench results}", r"\date{}", r"\maketitle", ""]
    for tname in tables:
        body.append(rf"\input{{tables/{tname}}}")
    for fname, orig in figs:
        wide = orig.startswith(WIDE_FIGURES)
        env = "figure*" if wide else "figure"
        width = r"\textwidth" if wide else r"\columnwidth"
        body += [rf"\begin{{{env}}}[t]", r"\centering", rf"\includegraphics[width={width}]{{figures/{fname}.pdf}}",
                 rf"\caption{{{tex_escape(_caption(orig))}}}", rf"\end{{{env}}}"]
    body += ["", r"\end{document}", ""]
    (paper_dir / "main.tex").write_text("\n".join(body))
    files.append(paper_dir / "main.tex")
    return files
