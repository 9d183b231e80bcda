"""Experiment presets (`conf/experiment/<name>.yaml`): one published table each, as a kvbench sweep, with the
published numbers attached and cited.

    kvbench run +experiment=NAME [key=value ...] [--dry-run]
    kvbench report results/<the preset's sweep>            # ours beside published, difference, inside our CI?

A preset file holds
  - `title`, `source` (where the published numbers come from: paper table and/or repository file at a commit),
    `notes` (what is not reproduced, values that could not be found);
  - `settings`: `key: value` overrides every job shares (the same keys as on the command line);
  - `grids`: a list of sweeps, each `key: [values]` (a method with its own knobs gets its own grid); every grid
    runs as one Hydra multirun into the same results dir (`settings.sweep`);
  - `published`: rows of `{model, method, budget | compression_ratio, query_aware, scores: {subtask: value}}`
    with values on the paper's scale (×100); `scores` keys are kvbench subtask names (`score/<subtask>` in a
    summary), `avg` the paper's average column. A preset whose numbers we could not find in a citable source
    has `published: []` and says so in `notes`: no number is ever filled in from memory.

The preset's keys reach the runs only as command-line overrides, so its metadata never enters a run's config
(or its identity): a run made through a preset is the same run as the one typed by hand.
Command-line overrides replace the preset's value of the same key; overriding a group (`model=...`) also
drops the preset's keys inside that group (`model.name`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

GROUPS = ("model", "task", "method")


def experiment_dir() -> Path:
    import kvbench.conf
    return Path(kvbench.conf.__path__[0]) / "experiment"


def experiment_names() -> list[str]:
    return sorted(p.stem for p in experiment_dir().glob("*.yaml"))


@dataclass
class Published:
    model: str | None
    task: str | None
    method: str
    budget: float | None
    compression_ratio: float | None
    query_aware: bool | None
    scores: dict[str, float]


@dataclass
class Preset:
    name: str
    title: str
    source: dict
    notes: list[str]
    settings: dict
    grids: list[dict]
    published: list[Published] = field(default_factory=list)

    @property
    def sweep(self) -> str:
        return str(self.settings.get("sweep", self.name))


class PresetError(ValueError):
    pass


def load_preset(name_or_path) -> Preset:
    p = Path(str(name_or_path))
    if not p.suffix:
        p = experiment_dir() / f"{name_or_path}.yaml"
    if not p.is_file():
        raise PresetError(f"unknown experiment {str(name_or_path)!r}; allowed: {', '.join(experiment_names())}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise PresetError(f"{p}: not YAML ({(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(d, dict) or not isinstance(d.get("grids"), list) or not d["grids"]:
        raise PresetError(f"{p}: a preset needs a non-empty `grids` list")
    pubs = []
    for i, r in enumerate(d.get("published") or []):
        if not isinstance(r, dict) or "method" not in r or not isinstance(r.get("scores"), dict):
            raise PresetError(f"{p}: published[{i}] needs `method` and `scores`")
        task = r.get("task", (d.get("settings") or {}).get("task"))
        pubs.append(Published(r.get("model"), None if task is None else str(task), str(r["method"]), _opt_float(r.get("budget")),
                               _opt_float(r.get("compression_ratio")), r.get("query_aware"),
                               {str(k): float(v) for k, v in r["scores"].items()}))
    return Preset(str(d.get("name", p.stem)), str(d.get("title", p.stem)), d.get("source") or {},
                  list(d.get("notes") or []), dict(d.get("settings") or {}), [dict(g) for g in d["grids"]], pubs)


def _opt_float(v):
    return None if v is None else float(v)


# -- preset -> command lines ------------------------------------------------------------------------------
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@-]+$")


def _value(v) -> str:
    """A Hydra override value for a YAML value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    s = str(v)
    return s if _PLAIN.match(s) else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _dropped_by(user_keys: set[str], key: str) -> bool:
    base = key.lstrip("+~")
    if base in user_keys:
        return True
    group = base.split(".", 1)[0]
    return "." in base and group in GROUPS and group in user_keys


def command_lines(preset: Preset, user_args: list[str]) -> list[list[str]]:
    """One override list per grid: the preset's settings and that grid's sweep, then the user's overrides
    (which win). Swept values are Hydra lists `key=a,b`; the caller adds -m."""
    user = [a for a in user_args if not a.startswith("-")]
    user_keys = {_key(a) for a in user}
    out = []
    for grid in preset.grids:
        args = [f"{k}={_value(v)}" for k, v in preset.settings.items() if not _dropped_by(user_keys, k)]
        for k, vals in grid.items():
            if _dropped_by(user_keys, k):
                continue
            vals = vals if isinstance(vals, list) else [vals]
            args.append(f"{k}=" + ",".join(_value(v) for v in vals))
        out.append(args + user)
    return out


def expand_experiment(args: list[str]) -> tuple[Preset | None, list[list[str]]]:
    """(preset, one argument list per grid) for a `kvbench run` command line holding `+experiment=NAME`;
    (None, [args]) when it holds none."""
    exp = [a for a in args if a.split("=", 1)[0] in ("+experiment", "experiment")]
    if not exp:
        return None, [args]
    if len(exp) > 1:
        raise PresetError("give one +experiment=NAME")
    preset = load_preset(exp[0].split("=", 1)[1])
    rest = [a for a in args if a not in exp]
    flags = [a for a in rest if a.startswith("-")]
    lines = []
    for c in command_lines(preset, rest):  # grids the user's overrides made identical run once
        if flags + c not in lines:
            lines.append(flags + c)
    return preset, lines


def results_root(preset: Preset, args: list[str]) -> Path:
    """Where the preset's runs go: results_dir (the command line's, else the preset's) / the sweep."""
    given = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == "results_dir"]
    sweep = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == "sweep"]
    root = given[-1] if given else str(preset.settings.get("results_dir", "results"))
    return Path(root) / (sweep[-1] if sweep else preset.sweep)


# -- published vs ours ------------------------------------------------------------------------------------
def _num(v) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) < 1e-9


def find_preset_for(runs) -> Preset | None:
    """The preset whose sweep name is the sweep every run was made in (config `sweep`), if any."""
    sweeps = {str((r.config or {}).get("sweep")) for r in runs}
    if len(sweeps) != 1:
        return None
    sweep = sweeps.pop()
    for name in experiment_names():
        try:
            p = load_preset(name)
        except PresetError:
            continue
        if p.sweep == sweep:
            return p
    return None


AVERAGES = {"avg", "avg_en", "avg_zh", "category_avg"}  # published averages over the row's tasks


def published_rows(preset: Preset, df) -> list[dict]:
    """One row per published cell: the published value, ours (×100), the difference, our bootstrap 95% CI
    and whether the published value lies inside it. Our cell: the runs of the same method and budget (or
    compression ratio; the full cache matches any) on the preset's task: the subtask's row for a subtask, the
    run's `score` for `avg` when the run has no `avg` subtask; repeated runs (seeds) are averaged. A published
    average (avg, avg_en) is compared only when we ran every task of its row (else ours is not the same mean)."""
    from .load import ALL
    whole = df[df["subtask"] == ALL]
    out = []
    for pub in preset.published:
        sel = df[df["method"] == pub.method]
        if pub.task is not None:
            sel = sel[sel["task"] == pub.task]
        if pub.method != "full":
            if pub.budget is not None:
                sel = sel[sel["budget"].map(lambda b: _same(None if b != b else b, pub.budget)).astype(bool)]
            elif pub.compression_ratio is not None:
                sel = sel[sel["compression_ratio"].map(
                    lambda r: _same(None if r != r else r, pub.compression_ratio)).astype(bool)]
        if pub.query_aware is not None:
            sel = sel[sel["query_aware"] == pub.query_aware]
        ran = set(sel[sel["subtask_kind"] == "subtask"]["subtask"]) if "subtask_kind" in sel else set()
        for sub, value in pub.scores.items():
            cell = sel[sel["subtask"] == sub]
            if cell.empty and sub == "avg":
                cell = sel[sel["subtask"] == ALL]
            if sub in AVERAGES and not set(pub.scores) - AVERAGES <= ran:
                cell = cell.iloc[0:0]  # our mean over fewer tasks than the paper's: not the same quantity
            ok = cell[cell["score"].notna()]
            ours = float(ok["score"].mean() * 100) if len(ok) else math.nan
            lo = float(ok["score_ci_low"].mean() * 100) if len(ok) and ok["score_ci_low"].notna().all() else math.nan
            hi = float(ok["score_ci_high"].mean() * 100) if len(ok) and ok["score_ci_high"].notna().all() else math.nan
            inside = None if math.isnan(lo) or math.isnan(hi) else bool(lo - 1e-9 <= value <= hi + 1e-9)
            models = sorted(set(ok["model"].dropna())) if len(ok) else sorted(set(whole["model"].dropna()))
            out.append({"task": pub.task, "method": pub.method, "budget": pub.budget, "compression_ratio": pub.compression_ratio,
                        "subtask": sub, "published": value, "ours": ours,
                        "diff": ours - value if not math.isnan(ours) else math.nan,
                        "ci_low": lo, "ci_high": hi, "inside_ci": inside,
                        "published_model": pub.model, "our_models": models, "n_runs": len(ok)})
    return out


def _f(v, d=2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def _setting(r: dict) -> str:
    if r["method"] == "full":
        return "full"
    if r["budget"] is not None:
        return f"{r['budget']:g}"
    if r["compression_ratio"] is not None:
        return f"ratio {r['compression_ratio']:g}"
    return "–"


def _inside(r: dict) -> str:
    return "–" if r["inside_ci"] is None else ("yes" if r["inside_ci"] else "no")


HEAD = ["method", "budget", "subtask", "published", "ours", "ours − published", "our 95% CI", "published in CI"]


def _cells(r: dict) -> list[str]:
    ci = "–" if math.isnan(r["ci_low"]) else f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}]"
    diff = "–" if math.isnan(r["diff"]) else f"{r['diff']:+.2f}"
    return [r["method"], _setting(r), r["subtask"], _f(r["published"]), _f(r["ours"]), diff, ci, _inside(r)]


def model_note(preset: Preset, rows: list[dict]) -> str | None:
    pub = sorted({r["published_model"] for r in rows if r["published_model"]})
    ours = sorted({m for r in rows for m in r["our_models"]})
    if pub and ours and not set(ours) <= {p.split("/")[-1] for p in pub} | set(pub):
        return (f"our runs used {', '.join(ours)}, the published numbers {', '.join(pub)}: the values are not "
                "expected to agree (this is a check of the path, not a reproduction)")
    return None


def source_line(preset: Preset) -> str:
    s = preset.source or {}
    return "; ".join(str(s[k]) for k in ("paper", "file", "url") if s.get(k)) or "no source"


def published_markdown(preset: Preset, rows: list[dict]) -> str:
    lines = [f"**Published vs ours: {preset.title}**", "", f"Source: {source_line(preset)}", ""]
    if not preset.published:
        lines += ["No published values attached to this preset: " + " ".join(preset.notes), ""]
        return "\n".join(lines)
    note = model_note(preset, rows)
    if note:
        lines += [f"Note: {note}.", ""]
    n_in = sum(1 for r in rows if r["inside_ci"])
    n_ci = sum(1 for r in rows if r["inside_ci"] is not None)
    n_miss = sum(1 for r in rows if math.isnan(r["ours"]))
    lines += [f"{len(rows)} published cells: {n_ci} with our CI, {n_in} inside it, "
              f"{n_miss} not run here. Scores ×100.", "",
              "| " + " | ".join(HEAD) + " |", "|---|---|---|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def published_text(preset: Preset, rows: list[dict]) -> str:
    """The same table, aligned for the terminal."""
    head = [f"published vs ours: {preset.title}", f"source: {source_line(preset)}"]
    if not preset.published:
        return "\n".join(head + ["no published values attached: " + " ".join(preset.notes)])
    note = model_note(preset, rows)
    if note:
        head.append(f"note: {note}")
    ran = [r for r in rows if not math.isnan(r["ours"])]
    if len(ran) < len(rows):
        head.append(f"{len(rows) - len(ran)} of {len(rows)} published cells not run here (all of them: published.md)")
    table = [HEAD] + [_cells(r) for r in ran]
    w = [max(len(r[i]) for r in table) for i in range(len(HEAD))]
    fmt = lambda r: "  ".join(c.rjust(x) if i >= 3 else c.ljust(x) for i, (c, x) in enumerate(zip(r, w)))
    return "\n".join(head + [fmt(table[0]), "  ".join("-" * x for x in w)] + [fmt(r) for r in table[1:]])


def published_latex(preset: Preset, rows: list[dict]) -> str:
    from .tables import tex_escape
    out = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{lllrrrrl}", r"\toprule",
           " & ".join(tex_escape(h) for h in HEAD) + r" \\", r"\midrule"]
    out += [" & ".join(tex_escape(c) for c in _cells(r)) + r" \\" for r in rows]
    out += [r"\bottomrule", r"\end{tabular}",
            rf"\caption{{{tex_escape('Published vs ours: ' + preset.title + '. Source: ' + source_line(preset))}}}",
            r"\end{table}"]
    return "\n".join(out) + "\n"
