# r7b-edge: every target creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# llama-cpp-python compiles llama.cpp from source; pip caches the wheel after the first build.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install dev test demo fixture quality bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

# torch first and pinned: the CPU wheel; an unpinned torch would pull a multi-GB GPU build.
$(VENV)/.dev: pyproject.toml $(VENV)/.core
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.core
dev: $(VENV)/.dev

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

demo: $(VENV)/.core
	$(BIN)/python scripts/demo.py

fixture: $(VENV)/.dev
	$(BIN)/python scripts/train_stand_in.py

quality: $(VENV)/.dev
	$(BIN)/python scripts/quality_report.py

bench: $(VENV)/.dev
	$(BIN)/python scripts/bench_report.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
