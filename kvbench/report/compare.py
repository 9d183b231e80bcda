"""`kvbench compare BASELINE CURRENT`: the regression gate.

Runs are matched by config hash, then by (model, task, method, budget, query_aware) (plus the seed
when that key alone is ambiguous). A pair fails when
  - a score (the run's, or a subtask's from `extra`) drops by more than `--tolerance` points (×100 scale),
    or, with `--ci`, also when the current score falls below the baseline's bootstrap 95% CI;
  - kv_bytes or decode FLOPs/token grow by more than a relative `--eps`;
  - the run was ok in the baseline and is not ok now, or is missing from the current results;
  - the run is incomplete on either side: its records.jsonl does not hold the records its summary counts
    (cut, emptied, damaged), so its numbers are not backed by its records.
Runs whose summary.json or config.yaml cannot be used are skipped with a warning naming the file.
Timing (TTFT, decode ms/token) is reported but never gated: it is too noisy across machines.
Exit 0: no regression; 1: regression; 2: bad input.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .load import Run, _name, _num, budget_label, find_runs

GATED_GROWTH = [("kv_bytes", "KV bytes"), ("decode_flops_per_token", "decode FLOPs/tok")]
TIMING = [("ttft_ms", "TTFT"), ("decode_ms_per_token", "decode ms/tok")]


@dataclass
class Entry:
    """The comparable numbers of one run."""
    run: Run
    hash: str | None
    key: tuple
    seed: object
    label: str
    status: str
    scores: dict[str, float]          # "score" and "score/<subtask>"
    ci_low: float
    metrics: dict[str, float]


def entry(run: Run) -> Entry:
    s, cfg = run.summary, run.config
    model, task, method = _name(s, cfg, "model"), _name(s, cfg, "task"), _name(s, cfg, "method")
    budget = s.get("budget", cfg.get("budget"))
    qa = s.get("query_aware", cfg.get("query_aware"))
    scores = {"score": _num(s.get("score"))}
    scores.update({k: _num(v) for k, v in (s.get("extra") or {}).items() if k.startswith("score/")})
    qa_txt = "" if qa is None else (" q-aware" if qa else " q-agnostic")
    return Entry(run, s.get("config_hash"), (model, task, method, budget, qa), cfg.get("seed"),
                 f"{model} · {task} · {method} @ {budget_label(method, budget, cfg)}{qa_txt}",
                 s.get("status", "ok"), scores, _num(s.get("score_ci_low")),
                 {k: _num(s.get(k)) for k, _ in GATED_GROWTH + TIMING})


def match(base: list[Entry], cur: list[Entry]):
    """Pairs (baseline, current), baseline entries missing in current, current entries that are new."""
    pairs = []
    cur_by_hash = {}
    for c in cur:
        if c.hash:
            cur_by_hash.setdefault(c.hash, []).append(c)
    left_b, used = [], set()
    for b in base:
        cands = [c for c in cur_by_hash.get(b.hash, []) if id(c) not in used] if b.hash else []
        if cands:
            pairs.append((b, cands[0]))
            used.add(id(cands[0]))
        else:
            left_b.append(b)
    left_c = [c for c in cur if id(c) not in used]

    # fallback: the config key, made unique with the seed when several runs share it
    def keyed(entries, with_seed):
        out = {}
        for e in entries:
            out.setdefault(e.key + ((e.seed,) if with_seed else ()), []).append(e)
        return out
    missing = []
    kb, kc = keyed(left_b, False), keyed(left_c, False)
    sb, sc = keyed(left_b, True), keyed(left_c, True)
    for b in left_b:
        k, ks = b.key, b.key + (b.seed,)
        if len(kb[k]) == 1 and len(kc.get(k, [])) == 1 and id(kc[k][0]) not in used:
            c = kc[k][0]
        elif len(sb[ks]) == 1 and len(sc.get(ks, [])) == 1 and id(sc[ks][0]) not in used:
            c = sc[ks][0]
        else:
            missing.append(b)
            continue
        pairs.append((b, c))
        used.add(id(c))
    new = [c for c in left_c if id(c) not in used]
    return pairs, missing, new


@dataclass
class Row:
    base: Entry
    cur: Entry
    problems: list[str] = field(default_factory=list)
    score_deltas: dict[str, float] = field(default_factory=dict)   # points ×100
    rel: dict[str, float] = field(default_factory=dict)            # relative change of metrics


def _rel(b: float, c: float) -> float:
    if math.isnan(b) or math.isnan(c):
        return math.nan
    return (c - b) / b if b else (0.0 if c == b else math.inf)


def check(b: Entry, c: Entry, tolerance: float, use_ci: bool, eps: float) -> Row:
    row = Row(b, c)
    if c.run.incomplete:
        row.problems.append(f"incomplete run ({c.run.incomplete}): {c.run.path}")
    if b.run.incomplete:
        row.problems.append(f"incomplete baseline run ({b.run.incomplete}): {b.run.path}")
    if b.status == "ok" and c.status != "ok":
        row.problems.append(f"status {b.status} → {c.status}")
    for k, bs in b.scores.items():
        if math.isnan(bs):
            continue
        cs = c.scores.get(k, math.nan)
        if math.isnan(cs):
            row.problems.append(f"{k} missing in current")
            continue
        d = (cs - bs) * 100
        row.score_deltas[k] = d
        if d < -tolerance - 1e-9:
            row.problems.append(f"{k} dropped {-d:.2f} points (> {tolerance:g})")
        elif use_ci and k == "score" and not math.isnan(b.ci_low) and cs < b.ci_low and cs < bs:
            row.problems.append(f"score {cs * 100:.2f} below the baseline 95% CI (low {b.ci_low * 100:.2f})")
    for k, name in GATED_GROWTH + TIMING:
        row.rel[k] = _rel(b.metrics[k], c.metrics[k])
    for k, name in GATED_GROWTH:
        if row.rel[k] > eps:
            row.problems.append(f"{name} grew {row.rel[k] * 100:+.2f}%")
    return row


def _pct(v: float) -> str:
    return "–" if math.isnan(v) else ("+inf" if math.isinf(v) else f"{v * 100:+.1f}%")


def _score_cell(r: Row) -> str:
    b, c = r.base.scores["score"], r.cur.scores.get("score", math.nan)
    if math.isnan(b) or math.isnan(c):
        return f"{'–' if math.isnan(b) else f'{b * 100:.1f}'} → {'–' if math.isnan(c) else f'{c * 100:.1f}'}"
    return f"{b * 100:.1f} → {c * 100:.1f} ({(c - b) * 100:+.1f})"


def markdown(rows: list[Row], missing: list[Entry], new: list[Entry], tolerance: float, use_ci: bool,
             eps: float, base_dir: str, cur_dir: str) -> str:
    n_bad = sum(bool(r.problems) for r in rows) + len(missing)
    head = (f"### ❌ kvbench: {n_bad} regression(s)" if n_bad else "### ✅ kvbench: no regression")
    out = [head, "",
           f"Compared `{cur_dir}` against `{base_dir}`: {len(rows)} matched run(s), {len(missing)} missing, "
           f"{len(new)} new. Gate: score drop > {tolerance:g} points"
           f"{' or below the baseline 95% CI' if use_ci else ''}; KV bytes or decode FLOPs growth > "
           f"{eps * 100:g}%. Timing is reported, not gated.", ""]
    bad = [r for r in rows if r.problems]
    if bad or missing:
        out += ["**Regressions**", ""]
        out += [f"- {r.cur.label}: " + "; ".join(r.problems) for r in bad]
        out += [f"- {m.label}: missing in current results" for m in missing]
        out.append("")
    if new:
        out += ["**New runs (not in baseline)**", ""] + [
            f"- {n.label}" + (f" (incomplete: {n.run.incomplete})" if n.run.incomplete else "") for n in new] + [""]
    incomplete = [r.cur for r in rows if r.cur.run.incomplete] + [r.base for r in rows if r.base.run.incomplete]
    if incomplete:
        out += ["**Incomplete runs** (records.jsonl does not back summary.json; rerun them to recompute what is "
                "missing)", ""] + [f"- `{e.run.path}`: {e.run.incomplete}" for e in incomplete] + [""]
    out += ["| run | score ×100 | worst subtask Δ | KV bytes | decode FLOPs/tok | TTFT | decode ms/tok | |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        subs = {k: v for k, v in r.score_deltas.items() if k != "score"}
        worst = min(subs.items(), key=lambda kv: kv[1]) if subs else None
        wtxt = f"{worst[0].split('/', 1)[1]} {worst[1]:+.1f}" if worst else "–"
        out.append(f"| {r.cur.label} | {_score_cell(r)} | {wtxt} | {_pct(r.rel['kv_bytes'])} | "
                   f"{_pct(r.rel['decode_flops_per_token'])} | {_pct(r.rel['ttft_ms'])} | "
                   f"{_pct(r.rel['decode_ms_per_token'])} | {'❌' if r.problems else '✅'} |")
    return "\n".join(out) + "\n"


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvbench compare", description=__doc__.split("\n")[0])
    p.add_argument("baseline", type=Path, help="baseline results dir (e.g. results/baselines/ci)")
    p.add_argument("current", type=Path, help="current results dir")
    p.add_argument("--tolerance", type=float, default=1.0, help="allowed score drop in points ×100 (default 1)")
    p.add_argument("--ci", action="store_true", help="also fail when a score falls below the baseline 95%% CI")
    p.add_argument("--eps", type=float, default=1e-3, help="allowed relative growth of KV bytes / FLOPs (default 1e-3)")
    p.add_argument("--out", type=Path, help="write the markdown summary here (e.g. summary.md)")
    a = p.parse_args(argv)
    if a.tolerance < 0 or a.eps < 0:
        print(f"kvbench compare: --tolerance={a.tolerance} and --eps={a.eps} must be >= 0", file=sys.stderr)
        return 2
    sides = []
    for name, d in (("baseline", a.baseline), ("current", a.current)):
        if not d.is_dir():
            print(f"kvbench compare: {name} dir {d} does not exist", file=sys.stderr)
            return 2
        runs = find_runs(d)
        if not runs:
            print(f"kvbench compare: {name} dir {d} has no runs (no summary.json below it)", file=sys.stderr)
            return 2
        sides.append([entry(r) for r in runs])
    pairs, missing, new = match(*sides)
    rows = [check(b, c, a.tolerance, a.ci, a.eps) for b, c in pairs]
    rows.sort(key=lambda r: tuple(str(x) for x in r.base.key[:3]) + (_num(r.base.key[3]) if r.base.key[3] is not None else -1.0,))
    md = markdown(rows, missing, new, a.tolerance, a.ci, a.eps, str(a.baseline), str(a.current))
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(md, encoding="utf-8")
    return 1 if missing or any(r.problems for r in rows) else 0
