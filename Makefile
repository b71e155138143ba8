# tessera — the README's commands. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU machines: the local CPU build of torch 2.13.0, installed before anything can pull a CUDA
# build. GPU machines: `make setup TORCH_SPEC='torch>=2.6'` keeps or installs the CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench bench-compression bench-serve lint clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/base.txt requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==26.0.1"
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

DEMO := --config jobs/configs/debug.yaml --set run.root_uri=runs/demo

demo: setup
	$(PY) jobs/prepare.py $(DEMO)
	$(PY) jobs/train_dvae.py $(DEMO)
	$(PY) jobs/encode.py $(DEMO)
	$(PY) jobs/train_prior.py $(DEMO)

test: setup
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/data_throughput.py
	$(PY) bench/train_throughput.py

# Needs the token dataset `make demo` writes (runs/demo/tokens); ~22 min on 2 cores.
bench-compression: setup
	$(PY) bench/compression.py --tokens runs/demo/tokens --steps 200 --rank 8 16

# Needs the model bundle (runs/demo/bundle); ~2 min: a burst of HTTP requests, autoscaling 1 -> 2 -> 1.
bench-serve: setup
	$(PY) bench/serve_load.py --bundle runs/demo/bundle

lint: setup
	$(VENV)/bin/ruff check platform jobs tests bench serve

lock: setup
	{ head -3 requirements/constraints.txt; $(PIP) freeze | grep -viE '^(-e |#)' | grep -viE '^(torch|tessera|sympy|mpmath|networkx|jinja2|markupsafe|filelock|typing.extensions|setuptools|pip)(==| )'; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache
