# The two commands: `make run` (the quickstart) and `make test` (the test suite).
# Each creates .venv when it is missing and installs what it needs.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
CONFIG ?= configs/quickstart.yaml
export DIFFPIPE_HOME ?= $(CURDIR)/.diffpipe

.PHONY: run test test-scenarios lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch and torchvision first and pinned: pip takes these releases from the local wheel store.
$(VENV)/.torch: | $(PY)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	touch $@

$(VENV)/.run: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.run

run: $(VENV)/.run
	$(VENV)/bin/diffpipe run --config $(CONFIG) --summary-out $(DIFFPIPE_HOME)/last-run.json
	@echo "summary: $(DIFFPIPE_HOME)/last-run.json"

test: $(VENV)/.dev
	$(VENV)/bin/pytest -m "not scenario"

# Long end-to-end scenarios on real servers (PostgreSQL, a Prefect server, three nights).
test-scenarios: $(VENV)/.dev
	$(VENV)/bin/pytest -m scenario

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy diffusion_core

bench: $(VENV)/.dev
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) .diffpipe
