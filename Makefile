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

.PHONY: setup demo demo-emoji test test-all bench bench-compression bench-serve lint docs clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/base.txt requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==26.0.1"
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	$(PIP) install --quiet --no-deps -e .
	@# DeepSpeed's CPU collectives op is compiled on first use (~40 s, g++ + ninja): build it now,
	@# with the packages, not inside the first training job (cached in ~/.cache/torch_extensions).
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
	touch $(STAMP)

DEMO := --config jobs/configs/debug.yaml --set run.root_uri=runs/demo
DEMO_SERVE ?= 1

# Every stage on the debug preset into runs/demo (a rerun skips finished stages), then serve the
# bundle on 127.0.0.1:8000 until Ctrl-C; DEMO_SERVE=0 stops after the evaluation report.
# `python -m serve` is `serve run` on a Ray of its own on 127.0.0.1 with Ray's token auth, as
# every job's Ray is (tessera.cluster.local_ray_env; the token: ~/.ray/auth_token, mode 0600).
demo: setup
	$(PY) jobs/pipeline.py $(DEMO)
ifneq ($(DEMO_SERVE),0)
	@echo "serving runs/demo/bundle (serve/config.yaml): web page http://127.0.0.1:8000/ ," \
	      "API http://127.0.0.1:8000/v1/images/generations ; Ctrl-C stops it"
	$(PY) -m serve serve/config.yaml
endif

# Every stage on real images and captions, the Noto emoji (jobs/configs/emoji.yaml), into runs/demo-emoji
# (its first prepare fetches the npm package, npm needed once, into runs/emoji-source; a rerun skips
# finished stages), then serve that bundle as `make demo` does; DEMO_SERVE=0 stops after the report.
demo-emoji: setup
	$(PY) jobs/pipeline.py --config jobs/configs/emoji.yaml --set run.root_uri=runs/demo-emoji
ifneq ($(DEMO_SERVE),0)
	@echo "serving runs/demo-emoji/bundle: web page http://127.0.0.1:8000/ ; Ctrl-C stops it"
	$(PY) -m serve serve.app:build_app bundle=runs/demo-emoji/bundle
endif

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

# docs/config.md is generated from the config models (a test checks it is current).
docs: setup
	$(PY) -m tessera.config_reference > docs/config.md

lint: setup
	$(VENV)/bin/ruff check platform jobs tests bench serve

lock: setup
	{ head -3 requirements/constraints.txt; $(PIP) freeze | grep -viE '^(-e |#)' | grep -viE '^(torch|tessera|sympy|mpmath|networkx|jinja2|markupsafe|filelock|typing.extensions|setuptools|pip)(==| )'; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache
