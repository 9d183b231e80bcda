"""Compare the same sweep run on different GPU counts (scripts/scale_out.sh), or report a spread model's runs.

    python scripts/compare_sweeps.py RESULTS_DIR...     one results_dir per GPU count, the first the baseline
    python scripts/compare_sweeps.py --spread RESULTS_DIR

Per results dir: runs, their status, the GPUs the jobs ran on (records' gpu_index), whether two jobs ever held
one GPU at once (from each run's started/finished times), the sweep's span. Then whether every run's records
equal the baseline's apart from timings and the machine they ran on.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from kvbench.results import TIMING_FIELDS

# what a record says of the machine and the moment, not of the config's results
MACHINE_FIELDS = {"device", "load_avg_1m", "cpu_count", "torch_threads", "other_cores", "gpu_index", "gpu_uuid",
                  "gpu_name", "model_params", "model_weight_bytes", "model_devices"}


def runs(root: Path) -> dict[str, tuple[dict, list[dict]]]:
    out = {}
    for s in sorted(root.glob("*/*/summary.json")):
        recs = [json.loads(l) for l in (s.parent / "records.jsonl").read_text().splitlines() if l.strip()]
        out[s.parent.name] = (json.loads(s.read_text()), recs)
    return out


def stable(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in set(TIMING_FIELDS) | MACHINE_FIELDS} for r in recs]


def ts(x: str) -> float:
    return datetime.fromisoformat(x).timestamp()


def sweep_report(root: Path, found: dict) -> None:
    by_gpu: dict = {}
    for h, (s, recs) in found.items():
        g = {r.get("gpu_index") for r in recs}
        by_gpu.setdefault(tuple(sorted(map(str, g))), []).append((ts(s["started_at"]), ts(s["finished_at"]), h))
    shared = []
    for g, spans in by_gpu.items():
        spans.sort()
        shared += [(g, a[2], b[2]) for a, b in zip(spans, spans[1:]) if b[0] < a[1] - 1.0]  # 1 s: clock granularity
    start = min(ts(s["started_at"]) for s, _ in found.values())
    end = max(ts(s["finished_at"]) for s, _ in found.values())
    status = {}
    for s, _ in found.values():
        status[s["status"]] = status.get(s["status"], 0) + 1
    names = {r.get("gpu_name") for _, recs in found.values() for r in recs}
    print(f"{root}: {len(found)} runs {status}; GPUs used: {sorted(by_gpu)} ({', '.join(map(str, names))}); "
          f"jobs per GPU: {[len(v) for v in by_gpu.values()]}; overlapping jobs on one GPU: {shared or 'none'}; "
          f"first start to last finish {end - start:.1f} s; sum of run wall_s {sum(s['wall_s'] for s, _ in found.values()):.1f} s")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--spread":
        for root in map(Path, argv[1:]):
            for h, (s, recs) in runs(root).items():
                for r in recs:
                    print(json.dumps({"method": s["method"], "status": s["status"], "context": r.get("context_tokens"),
                                      "ttft_ms": r.get("ttft_ms"), "decode_ms_per_token": r.get("decode_ms_per_token"),
                                      "decode_path": r.get("decode_path"), "kv_bytes": r.get("kv_bytes"),
                                      "kv_bytes_per_device": r.get("kv_bytes_per_device"),
                                      "peak_mem_bytes_per_device": r.get("peak_mem_bytes_per_device"),
                                      "model_devices": r.get("model_devices"), "device": r.get("device"),
                                      "error": s.get("error")}))
        return 0
    roots = [Path(a) for a in argv]
    found = [runs(r) for r in roots]
    for root, f in zip(roots, found):
        sweep_report(root, f)
    base = found[0]
    for root, f in zip(roots[1:], found[1:]):
        diff = [h for h in base if h not in f or stable(base[h][1]) != stable(f[h][1])]
        print(f"{root} vs {roots[0]}: {len(base) - len(diff)}/{len(base)} runs with records identical apart from "
              f"timings and machine fields" + (f"; different: {diff}" if diff else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
