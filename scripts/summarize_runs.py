"""Print one markdown row per run of the given sweep directories, from each run's summary.json:
method (+ format and its knobs), budget, task grid, score, bytes stored / read per decoded token, TTFT, decode
ms/token, and (--kept) the mean kept tokens per layer and head. Used for the closing tables of issues 13 and 18.

    python scripts/summarize_runs.py [--kept] results/SWEEP [...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def knobs(cfg: dict) -> str:
    """The knobs that tell runs of one method apart (format knobs, ranks, budgets of selectors)."""
    m = cfg.get("method", {})
    parts = []
    for key in ("bits", "rank", "ratio", "token_budget"):
        if key in m:
            parts.append(f"{key}={m[key]}")
    for slot in ("storage", "selector"):
        f = m.get(slot)
        if isinstance(f, dict) and f.get("name") not in (None, "plain"):
            parts.append(f"{slot}={f['name']}" + "".join(f",{k}={v}" for k, v in f.items() if k in ("bits", "rank", "ratio", "token_budget")))
    return " ".join(parts)


def mib(x):
    return "-" if x is None else f"{x / 2**20:.2f}"


def num(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def main(argv: list[str]) -> None:
    kept = "--kept" in argv
    dirs = [Path(a) for a in argv if a != "--kept"]
    head = ["sweep", "task", "lengths", "method", "knobs", "budget", "score", "n", "KV MiB stored", "KV MiB read/token",
            "TTFT ms (median)", "decode ms/token (median)", "device"] + (["kept/layer/head", "context"] if kept else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for d in dirs:
        for f in sorted(d.glob("*/summary.json")):
            s = json.loads(f.read_text())
            cfg = s.get("config", {})
            row = [d.name, str(s.get("task")), str(cfg.get("task", {}).get("lengths")), str(s.get("method")), knobs(cfg),
                   str(s.get("budget") if s.get("budget") is not None else "-"),
                   num(None if s.get("score") is None else 100 * s["score"]),
                   f"{s.get('n')}/{s.get('n_records')}", mib(s.get("kv_bytes")), mib(s.get("kv_bytes_read_per_token")),
                   num(s.get("ttft_ms_median")), num(s.get("decode_ms_per_token_median"), "{:.2f}"),
                   str((s.get("conditions") or {}).get("device"))]
            if kept:
                row += [num(s.get("kept_tokens")), num(s.get("context_tokens"), "{:.0f}")]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
