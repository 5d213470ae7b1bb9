# Two front-door commands: `make demo` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU build on this disk; the package's torch range admits it,
# so nothing bigger is pulled afterwards.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/datablame demo

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

# everything but the tests marked slow (they train a model for more than a few seconds)
test-fast: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests bench
