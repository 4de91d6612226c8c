# One command checks everything: `make check` (lint + types + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: install demo test lint typecheck check bench

$(BIN)/drainctl: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/drainctl

demo: install
	$(BIN)/drainctl demo

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy
	$(BIN)/lint-imports

check: lint typecheck test

bench: install
	$(BIN)/python -m bench.simspeed
