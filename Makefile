# FusionRec entry points. The README names two: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
# The one CLI (tools/cli.py); `$(PY) -m tools.cli` works before the console script is (re)installed.
FUSIONREC := $(PY) -m tools.cli
DATA ?= movielens:data/ml-latest-small
ARTIFACTS ?= artifacts
MODEL_REPO ?= model_repository
TRITON_SITE = $(TRITON_VENV)/lib/python3.11/site-packages
TRITON_HOME = $(TRITON_SITE)/pytriton/tritonserver

.PHONY: help setup venv triton protos system-packages artifacts run test test-unit bench bench-batching bench-hop bench-scale loadtest loadtest-overload eval eval-seeds clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

setup: venv triton protos  ## create both virtual environments and generate stubs

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-nodeps.txt deploy/python-packages.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r deploy/python-packages.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Triton Inference Server: the tritonserver binary from nvidia-pytriton, in its own venv (numpy<2).
triton: $(TRITON_VENV)/.installed
$(TRITON_VENV)/.installed: requirements-triton.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q -r requirements-triton.txt
	cp $(TRITON_HOME)/python_backend_stubs/3.11/triton_python_backend_stub $(TRITON_HOME)/backends/python/
	touch $@

protos: protos/fusionrec_pb2.py
protos/fusionrec_pb2.py: protos/fusionrec.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/fusionrec.proto

# Commands the tests run for real, from the Debian packages in deploy/apt-packages.txt: prometheus
# (+ promtool), redis-server, and setpriv (util-linux), which starts the supervisor's children.
# Nothing to do when all are on PATH; as root with apt-get the packages are installed; otherwise
# stop at once naming the one command to run. `make run` needs none of them (see tools/stack.py).
SYSTEM_COMMANDS := prometheus promtool redis-server setpriv
APT_PACKAGES = $(shell grep -v '^\#' deploy/apt-packages.txt)
system-packages:  ## install Debian's prometheus + redis-server (deploy/apt-packages.txt) when missing
	@missing="$$(for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || echo $$c; done | xargs)"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "missing: $$missing (needed by make test). Run once, then make test again:" >&2; \
	  if command -v apt-get >/dev/null; then echo "  sudo apt-get install -y --no-install-recommends $(APT_PACKAGES)" >&2; \
	  else echo "  install $(APT_PACKAGES) with your system's package manager" >&2; fi; \
	  exit 1; \
	fi; \
	echo "installing $(APT_PACKAGES) (missing: $$missing) ..."; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || { echo "still missing after apt-get: $$c" >&2; exit 1; }; done

artifacts: setup  ## build a new artifact version: make artifacts DATA=movielens:data/ml-latest-small
	$(FUSIONREC) build --data $(DATA) --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO)

$(ARTIFACTS)/LATEST:
	$(MAKE) artifacts

run: setup $(ARTIFACTS)/LATEST  ## start Triton + retrieval + ranking + gateway on loopback, print samples, serve until Ctrl-C (RUN_ARGS=--colocated: Triton + one process)
	$(FUSIONREC) run --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO) $(RUN_ARGS)

test: system-packages setup  ## all tests, integration tests included (real Triton, FAISS, LightGBM)
	$(PY) -m pytest -q

test-unit: system-packages setup
	$(PY) -m pytest -q tests/unit

# `make bench` measures 50 rps on an empty store, then seeds it through the public API (10,000
# deleted + 1,000 online items) and measures again: both rows side by side. BENCH_ARGS= for one row.
BENCH_ARGS ?= --deleted 10000 --online 1000

bench: setup $(ARTIFACTS)/LATEST  ## open-loop benchmark of the gateway, empty vs seeded store; writes reports/bench/serving.json (BENCH_ARGS=...)
	$(FUSIONREC) bench --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO) --rate 50 --duration 20 $(BENCH_ARGS)

bench-batching: setup $(ARTIFACTS)/LATEST  ## fused ranker on Triton, dynamic batching on vs off; writes reports/bench/triton_batching.json
	$(FUSIONREC) bench-batching --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO)

bench-hop: setup  ## one bare gRPC hop (plaintext and mTLS): server and client core-ms per call; writes reports/bench/hop.json
	$(FUSIONREC) bench-hop

# SIZES=10000,100000 limits it (the 1M-item catalog takes the longest: see README "Scale benchmark").
SIZES ?= 10000,100000,1000000

bench-scale: setup  ## synthetic catalogs (brought embeddings) built and served per size; reports/bench/scale.json + .png (SIZES=...)
	$(FUSIONREC) bench-scale --sizes $(SIZES)

eval: setup $(ARTIFACTS)/LATEST  ## offline quality report on the held-out test split -> reports/<dataset>/
	$(FUSIONREC) eval --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO) $(if $(EVAL_USERS),--max-users $(EVAL_USERS))

SEEDS ?= 5

eval-seeds: setup  ## SEEDS builds (seeds 0..SEEDS-1, temporary artifact roots), each evaluated: mean ± sd of nDCG@10 -> reports/<dataset>/seeds.json (EVAL_USERS=...)
	$(FUSIONREC) eval-seeds --data $(DATA) --seeds $(SEEDS) $(if $(EVAL_USERS),--max-users $(EVAL_USERS))

LOADTEST_ARGS ?= --ramp --rate 25 --ramp-step 25 --ramp-max 300 --duration 10 --warmup 3

loadtest: setup $(ARTIFACTS)/LATEST  ## open-loop ramp against a fresh stack; reports/loadtest/<time>.json + .png (LOADTEST_ARGS=...)
	$(FUSIONREC) loadtest --stack --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO) $(LOADTEST_ARGS)

# Overload: the highest rate holding p99 <= 100 ms, then 1x/2x/3x/6x of it (10 s each, 200 ms client
# deadline), test users replayed: goodput, shed share, p50/p99, nDCG@10 -> reports/loadtest/overload.json
OVERLOAD_ARGS ?= --rate 50 --ramp-step 50 --ramp-max 600 --search-duration 4 --duration 10 --warmup 2

loadtest-overload: setup $(ARTIFACTS)/LATEST  ## overload mode on a fresh stack: goodput, shed share and nDCG@10 at 1x..6x the held rate (OVERLOAD_ARGS=...)
	$(FUSIONREC) loadtest --stack --overload --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO) $(OVERLOAD_ARGS)

clean:
	rm -rf $(ARTIFACTS) $(MODEL_REPO)/*/[0-9]* $(MODEL_REPO)/*/config.pbtxt reports .cache
