# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-quick system-deps clean

$(BIN)/vitpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

setup: $(BIN)/vitpipe

demo: setup
	$(BIN)/vitpipe demo

# Debian services some tests need (Slurm + munge, Chromium); skipped when not root / no apt.
system-deps:
	bash tests/system-deps.sh

test: setup system-deps
	$(BIN)/python -m pytest

test-quick: setup
	$(BIN)/python -m pytest -m "not slow and not multiprocess"

clean:
	rm -rf $(VENV) demo-output .pytest_cache
