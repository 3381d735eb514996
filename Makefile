# FusionRec entry points. The README names two: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
DATA ?= movielens:data/ml-latest-small
ARTIFACTS ?= artifacts
MODEL_REPO ?= model_repository
TRITON_SITE = $(TRITON_VENV)/lib/python3.11/site-packages
TRITON_HOME = $(TRITON_SITE)/pytriton/tritonserver

.PHONY: help setup venv triton protos artifacts run test test-unit bench bench-batching loadtest eval clean

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

artifacts: setup  ## build a new artifact version: make artifacts DATA=movielens:data/ml-latest-small
	$(PY) -m offline build --data $(DATA) --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO)

$(ARTIFACTS)/LATEST:
	$(MAKE) artifacts

run: setup $(ARTIFACTS)/LATEST  ## start Triton + retrieval + ranking + gateway on loopback, print samples, serve until Ctrl-C
	$(PY) -m common.cli run --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO)

test: setup  ## all tests, integration tests included (real Triton, FAISS, LightGBM)
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup $(ARTIFACTS)/LATEST  ## open-loop benchmark of the gateway; writes reports/bench/serving.json
	$(PY) -m common.cli bench --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO) --rate 50 --duration 20

bench-batching: setup $(ARTIFACTS)/LATEST  ## fused ranker on Triton, dynamic batching on vs off; writes reports/bench/triton_batching.json
	$(PY) -m ranking.bench_batching --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO)

eval: setup $(ARTIFACTS)/LATEST  ## offline quality report on the held-out test split -> reports/<dataset>/
	$(PY) -m offline.evaluate --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO) $(if $(EVAL_USERS),--max-users $(EVAL_USERS))

LOADTEST_ARGS ?= --ramp --rate 25 --ramp-step 25 --ramp-max 300 --duration 10 --warmup 3

loadtest: setup $(ARTIFACTS)/LATEST  ## open-loop ramp against a fresh stack; reports/loadtest/<time>.json + .png (LOADTEST_ARGS=...)
	$(PY) -m common.cli loadtest --stack --artifacts $(ARTIFACTS) --model-repo $(MODEL_REPO) $(LOADTEST_ARGS)

clean:
	rm -rf $(ARTIFACTS) $(MODEL_REPO)/*/[0-9]* $(MODEL_REPO)/*/config.pbtxt reports .cache
