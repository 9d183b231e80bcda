#!/usr/bin/env bash
# Closing tables of issues 13 and 18 on a GPU with the embedded model (second device call, after the first
# copied .carry/model_a etc. to /tmp/carry1; see scripts/device_setup.sh).
#   bash scripts/gpu_tables.sh 13        storage formats: RULER-NIAH 4K (query_aware) and NIAH 1K-8K
#   bash scripts/gpu_tables.sh 18 A|B    every method at budgets 128/512 on RULER-NIAH 1K and 4K (two halves)
# Every table row comes from the run's summary.json (printed by scripts/summarize_runs.py).
set -o pipefail
source scripts/device_setup.sh
# RULER's generator needs wonderwords (its word lists): installed from the carried wheel
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/wonderwords*.whl 2>/dev/null
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
REPO=$(pwd)
nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp
run() { python3 -m kvbench.cli run "$@" results_dir=/tmp/res 2>&1 | grep -v "^\[kvbench\]" | tail -3; }
case "$1" in
13)
  N=${N:-5}
  RULER="task=ruler_niah task.lengths=[4096] task.num_samples=$N query_aware=true sweep=t13_ruler"
  NIAH="task=niah task.lengths=[1000,2000,4000,8000] query_aware=true sweep=t13_niah"
  case "${2:-both}" in ruler) SETS=("$RULER");; niah) SETS=("$NIAH");; *) SETS=("$RULER" "$NIAH");; esac
  for T in "${SETS[@]}"; do
    run -m method=full,kivi,think,minicache $T
    run method=kivi method.bits=4 $T
    run -m method=eigen_attention method.rank=32,48 $T
    run -m method=quest method.token_budget=256,1024 $T
    run method=snapkv method.storage=kivi budget=256 $T
    run method=snapkv budget=256 $T
  done
  python3 "$REPO/scripts/summarize_runs.py" /tmp/res/t13_ruler /tmp/res/t13_niah | tee "$OUTDIR/table13.txt" ;;
18)
  N=${N:-3}
  ALL=$(python3 -c "from kvbench.method import load_all_methods as l; print(' '.join(sorted(n for n, c in l().items() if c.uses_budget)))")
  set -- $1 ${2:-A}
  HALF=$(python3 -c "import sys; a=sys.argv[2].split(); h=len(a)//2; print(','.join(a[:h] if sys.argv[1]=='A' else a[h:]))" "$2" "$ALL")
  run -m method=$HALF budget=128,512 task=ruler_niah 'task.lengths=[1024,4096]' task.num_samples=$N query_aware=true sweep=t18
  [ "$2" = A ] && run method=full task=ruler_niah 'task.lengths=[1024,4096]' task.num_samples=$N query_aware=true sweep=t18
  python3 "$REPO/scripts/summarize_runs.py" --kept /tmp/res/t18 | tee "$OUTDIR/table18_$2.txt" ;;
esac
