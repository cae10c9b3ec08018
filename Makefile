# medops: `make run` brings the platform up on embedded defaults, `make test` runs every test.
# The first target of each bootstraps .venv from the lock in requirements/ (fast when nothing changed).
# Bytecode is compiled at install: the DAG processor and every task start parse no Python source again.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synced
export PATH := $(abspath $(BIN)):$(PATH)

# A gate that can fail: any high-severity, high-confidence finding in the project's code.
BANDIT := --quiet --recursive medops pipelines serving monitoring dags --severity-level high --confidence-level high

.PHONY: venv chromium run stop test test-fast lint bench lock clean

venv: $(STAMP)

# uv is bootstrapped with pip into the venv itself, so nothing outside the checkout is needed.
$(STAMP): requirements/dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	@VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv pip sync --quiet --compile-bytecode requirements/dev.txt
	@VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Debian's Chromium for tests/test_browser.py: Playwright drives it, no browser is downloaded.
chromium:
	@test -x /usr/bin/chromium || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y chromium || \
		{ $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update && $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y chromium; }; }

lock:
	$(BIN)/uv pip compile --quiet --no-header --python-version 3.11 requirements/base.in -o requirements/base.txt
	$(BIN)/uv pip compile --quiet --no-header --python-version 3.11 requirements/dev.in -o requirements/dev.txt
	$(BIN)/uv pip compile --quiet --no-header --python-version 3.11 requirements/serving.in -c requirements/base.txt -o requirements/serving.txt

run: venv
	$(BIN)/medops up

stop: venv
	$(BIN)/medops down

test: venv chromium
	$(BIN)/ruff check medops pipelines serving monitoring dags tests bench
	$(BIN)/lint-imports
	$(BIN)/bandit $(BANDIT)
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not e2e and not integration"

lint: venv
	$(BIN)/ruff check medops pipelines serving monitoring dags tests bench
	$(BIN)/lint-imports
	$(BIN)/bandit $(BANDIT)

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .medops
