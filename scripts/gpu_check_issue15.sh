#!/usr/bin/env bash
# Issue 15 on a GPU (second device call, after the first copied .carry/model_a etc. to /tmp/carry1; see
# scripts/device_setup.sh): (1) the first sample of a run is timed like the others — the same NIAH sweep in
# two fresh processes, warmup=false then warmup=true, each run's first-sample TTFT beside the rest; (2) the
# kvbench / kvpress decode benchmark, each framework in its own process, kvpress timed on a second pass.
set -o pipefail
source scripts/device_setup.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/kvpress*.whl .carry/whl/datasets*.whl \
  .carry/whl/dill*.whl .carry/whl/multiprocess*.whl .carry/whl/fire*.whl .carry/whl/termcolor*.whl \
  .carry/whl/cachetools*.whl 2>/dev/null
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
REPO=$(pwd)
nvidia-smi --query-gpu=name --format=csv,noheader
( cd /tmp
  for w in false true; do
    echo "== warmup=$w (fresh process) =="
    python3 -m kvbench.cli run -m method=full,snapkv,pyramidkv budget=256 task=niah 'task.lengths=[2000,4000,8000]' \
      'task.depths=[10,50,90]' warmup=$w results_dir=/tmp/res sweep=warmup_$w 2>&1 | grep -v "^\[kvbench\]" | tail -6
    python3 - "$w" <<'PY'
import json, statistics, sys
from pathlib import Path
for d in sorted(Path(f"/tmp/res/warmup_{sys.argv[1]}").glob("*/summary.json")):
    s = json.loads(d.read_text())
    r = [json.loads(l) for l in open(d.parent / "records.jsonl")]
    t = [x["ttft_ms"] for x in r]
    print(f"{s['method']:<10} warmup_ms={s['setup'].get('warmup_ms') or 0:8.0f}  first sample ttft={t[0]:7.1f}  "
          f"median of the others={statistics.median(t[1:]):6.1f}  mean={s['ttft_ms']:6.1f}  median={s['ttft_ms_median']:6.1f}  "
          f"decode ms/tok first={r[0]['decode_ms_per_token']:.2f} others median={statistics.median(x['decode_ms_per_token'] for x in r[1:]):.2f}  "
          f"device={s['conditions']['device']} loaded={s['conditions']['loaded']}")
PY
  done ) 2>&1 | tee "$OUTDIR/warmup_check.txt"
cd "$REPO" && python3 bench/gpu_speed.py --lengths 32768 --with-kvpress --deadline-s "${SPEED_DEADLINE:-330}" 2>&1 \
  | tee "$OUTDIR/gpu_speed.txt"
