#!/usr/bin/env bash
# Issue 14's measurements on a multi-GPU host (second device call, after the first copied .carry/model_a etc. to
# /tmp/carry1; see scripts/device_setup.sh; .carry/whl must hold submitit and hydra-submitit-launcher).
#   bash scripts/scale_out.sh sweep "1 4"     the same 8-run sweep (embedded model, RULER-NIAH 4K) through
#                                             hydra/launcher=gpus on the first 1, then 4 GPUs: wall time, speed-up,
#                                             records identical apart from timings
#   bash scripts/scale_out.sh spread          synthetic llama-3.1-70b (141 GB in bf16) over every GPU with
#                                             model.device_map=auto: full / snapkv / streaming_llm at 32K
set -o pipefail
source scripts/device_setup.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
REPO=$(pwd)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUTDIR/gpus.txt"
cd /tmp
SWEEP="task=ruler_niah task.lengths=[4096] task.num_samples=${N:-4} method=snapkv,pyramidkv,adakv,streaming_llm budget=128,512"
case "$1" in
sweep)
  python3 -c "from kvbench.models import load_model; load_model()"  # dequantize the GGUF once, before timing
  for n in ${2:-1 4}; do
    vis=$(seq -s, 0 $((n - 1)))
    t0=$(date +%s.%N)
    CUDA_VISIBLE_DEVICES=$vis python3 -m kvbench.cli run -m hydra/launcher=gpus $SWEEP results_dir=/tmp/res_$n \
      > "$OUTDIR/sweep_$n.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    echo "gpus=$n rc=$rc wall_s=$(python3 -c "print(round($t1 - $t0, 1))")" | tee -a "$OUTDIR/sweep_wall.txt"
    tail -12 "$OUTDIR/sweep_$n.log"
  done
  python3 "$REPO/scripts/compare_sweeps.py" /tmp/res_* | tee "$OUTDIR/sweep_compare.txt" ;;
spread)
  # one process (Hydra's basic launcher): the model is built once and serves the three runs
  python3 -m kvbench.cli run -m model=synthetic model.shape=llama-3.1-70b model.device_map=auto \
    method=full,snapkv,streaming_llm budget=1024 task=niah 'task.lengths=[32000]' 'task.depths=[50]' \
    task.max_new_tokens=32 results_dir=/tmp/res_spread 2>&1 | tail -8
  python3 "$REPO/scripts/compare_sweeps.py" --spread /tmp/res_spread | tee "$OUTDIR/spread.txt" ;;
esac
cp -r /tmp/res_* "$OUTDIR/" 2>/dev/null
true
