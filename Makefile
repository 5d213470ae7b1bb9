# Two front-door commands: `make demo` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench browser

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

# The HTML report's browser tests drive Debian's chromium (Playwright never downloads a
# browser). Installed when missing and we may; otherwise those tests skip (CI sets
# DATABLAME_REQUIRE_BROWSER=1, which turns the skip into a failure).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && \
	    $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; } || \
	  echo "note: chromium not installed (apt-get install chromium): browser tests skip"; }

demo: setup
	$(BIN)/datablame demo

test: setup browser
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q

# everything but the tests marked slow (they train a model for more than a few seconds)
test-fast: setup browser
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests bench
