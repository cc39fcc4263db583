# Two commands on a fresh machine: `make run` and `make test`. Both create .venv from the lock files
# and reuse it on the next call (the stamp files below track the lock files).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RAW_SAMPLE := data/01_raw/cassava_sample

.PHONY: run test lint format sample viz notebook lock clean-env bench-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

$(VENV)/.installed: requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: requirements-dev.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-deps -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@ $(VENV)/.installed

# conf/local is git-ignored (secrets, machine settings); a fresh clone gets an empty credentials file.
conf/local/credentials.yml:
	mkdir -p conf/local
	printf '%s\n' '# Machine-specific secrets (git-ignored); see README.' > $@

# The embedded sample is generated (deterministically) only when its raw folder is empty.
sample: $(VENV)/.installed conf/local/credentials.yml
	@if [ -z "$$(ls -A $(RAW_SAMPLE) 2>/dev/null | grep -v '^.gitkeep$$')" ]; then \
		$(BIN)/kedro run --pipelines=sample_data; \
	fi

run: sample
	$(BIN)/kedro run --pipelines=cassava

# One worker per core (pytest-xdist), each test file whole on one worker so that its module
# fixtures (a demo project, a DVC repository) are built once; tests/conftest.py gives each
# worker one thread. `.venv/bin/python -m pytest tests/...` runs in one process, as usual.
test: $(VENV)/.installed-dev conf/local/credentials.yml lint
	$(BIN)/python -m pytest -n auto --dist loadfile

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

viz: $(VENV)/.installed
	$(BIN)/kedro viz run

# JupyterLab on the project's .venv (dev lock); the notebook loads the catalog with kedro.ipython.
notebook: $(VENV)/.installed-dev conf/local/credentials.yml
	$(BIN)/jupyter lab notebooks/cassava.ipynb

# Regenerate the lock files after changing pyproject.toml: resolve in throw-away environments
# (with constraints.txt) and freeze them, so the locks list exactly what pip installed.
lock:
	bash tools/lock.sh

# Benchmarks against fastai (benchmarks/fastai_compare.py, loader.py): a separate environment with
# the project's lock plus fastai and its own dependencies, so fastai never enters the product.
BENCH := .venv-bench
$(BENCH)/.installed: requirements.lock benchmarks/requirements-fastai.lock pyproject.toml
	$(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(BENCH)/bin/pip install --quiet --no-deps -r requirements.lock -r benchmarks/requirements-fastai.lock
	$(BENCH)/bin/pip install --quiet --no-deps -e .
	touch $@

bench-env: $(BENCH)/.installed

clean-env:
	rm -rf $(VENV) $(BENCH)
