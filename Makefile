# Two commands do all the set-up on a fresh machine with Python >= 3.10 and pip:
#   make quickstart   # installs into .venv, pretrains a small ViT on built-in photos, evaluates, writes a report
#   make test         # installs the dev dependencies, runs the test suite (slow tests deselected)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install dev quickstart test test-all lint format clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e ".[dev]"
	# The April 2023 release of the official code, used only as a test reference. Its pins (torch 2.0,
	# xformers, mmcv…) are irrelevant to the modules we compare against, so it goes in without them.
	$(PIP) --no-deps "dinov2==0.0.1.dev2"
	touch $@

install: $(VENV)/.core

dev: $(VENV)/.dev

quickstart: $(VENV)/.core
	$(VENV)/bin/dinolab quickstart --output quickstart_report

test: $(VENV)/.dev
	$(PY) -m pytest -q -m "not slow" --timeout=600

test-all: $(VENV)/.dev
	$(PY) -m pytest -q --timeout=1800

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache quickstart_report
