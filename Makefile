# r7b-edge: every target creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# llama-cpp-python compiles llama.cpp from source, with the RPC backend on, once per version:
# scripts/llama_wheel.sh keeps the wheel in a cache outside the repository.
LLAMA_CPP_VERSION ?= 0.3.36
export R7B_CACHE ?= $(HOME)/.cache/r7b-edge
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install dev test demo fixture quality bench rehearsal clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml scripts/llama_wheel.sh | $(BIN)/python
	$(BIN)/pip install -q "$$(PYTHON=$(BIN)/python scripts/llama_wheel.sh $(LLAMA_CPP_VERSION))"
	$(BIN)/pip install -e .
	@$(BIN)/python -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_rpc())" || { \
	  echo "llama-cpp-python in $(VENV) lacks the RPC backend; reinstalling the RPC build"; \
	  $(BIN)/pip install -q --force-reinstall --no-deps "$$(PYTHON=$(BIN)/python scripts/llama_wheel.sh $(LLAMA_CPP_VERSION))"; }
	touch $@

# torch first and pinned: the CPU wheel; an unpinned torch would pull a multi-GB GPU build.
$(VENV)/.dev: pyproject.toml $(VENV)/.core
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.core
dev: $(VENV)/.dev

test: $(VENV)/.dev peers
	$(BIN)/python -m pytest -q

demo: $(VENV)/.core
	$(BIN)/python scripts/demo.py

fixture: $(VENV)/.dev
	$(BIN)/python scripts/train_stand_in.py

quality: $(VENV)/.dev
	$(BIN)/python scripts/quality_report.py

# Also runs llama.cpp's own tools beside r7b (llama-bench, llama-server, llama-quantize, llama-imatrix,
# llama-perplexity): scripts/peer_bench.py and scripts/serve_bench.py, called by bench_report.py.
bench: $(VENV)/.dev peers
	$(BIN)/python scripts/bench_report.py
	mkdir -p $(R7B_CACHE)/bench
	$(BIN)/r7b convert tests/fixtures/tiny-r7b -o $(R7B_CACHE)/bench/tiny-r7b-F16.gguf --force -q
	$(BIN)/python scripts/rpc_bench.py $(R7B_CACHE)/bench/tiny-r7b-F16.gguf

# Every user step on a random-weights model of Command R7B's full size (about an hour on 2 cores, up to
# 35 GB of disk at once); writes docs/rehearsal.md. Not part of `make test`.
rehearsal: $(VENV)/.dev
	$(BIN)/python scripts/rehearsal.py

# llama.cpp's own tools (llama-bench, llama-server, ...) as a yardstick, built from the same
# llama-cpp-python sdist into $(R7B_CACHE)/peers/<version>/bin, once per version (scripts/peers.sh).
.PHONY: peers
peers:
	LLAMA_CPP_VERSION=$(LLAMA_CPP_VERSION) scripts/peers.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache
