# Two commands on a fresh machine: `make run` serves the bundled model on port 8000,
# `make test` runs lint, type checks and the tests. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: help run test lint typecheck pytest dataset train evaluate bench bench-peers-setup loadtest reliability soak fuzz fleet scaling image image-test byom wheel clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 20

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt bench/requirements.txt loadtest/requirements.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(VENV)/.train: requirements-train.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-train.txt
	touch $@

$(VENV)/.bench: bench/requirements.txt loadtest/requirements.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

# The benchmark's peers, each in its own pinned environment (bench/peers/*.txt).
.venv-peers/%/.installed: bench/peers/%.txt
	$(PYTHON) -m venv .venv-peers/$*
	.venv-peers/$*/bin/python -m pip install --quiet --disable-pip-version-check -r $<
	touch $@

bench-peers-setup: .venv-peers/mosec/.installed .venv-peers/pytriton/.installed .venv-peers/infinity/.installed  ## mosec, PyTriton and Infinity for make bench (~2.5 GB)

run: $(VENV)/.runtime  ## serve the configured model on port 8000 (ARGS="--set batching.max_wait_s=0.001")
	$(PY) app.py $(ARGS)

test: lint typecheck pytest  ## lint, type checks and the whole test suite

lint: $(VENV)/.dev  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.dev  ## mypy --strict over the package and tests
	$(VENV)/bin/mypy

deploy/validate/node_modules/.installed: deploy/validate/package-lock.json
	cd deploy/validate && npm ci --silent --no-audit --no-fund
	touch $@

pytest: $(VENV)/.dev deploy/validate/node_modules/.installed  ## the tests only
	$(PY) -m pytest -q $(ARGS)

dataset: $(VENV)/.runtime  ## regenerate data/intents from scripts/dataset_phrases.py (fixed seed)
	$(PY) scripts/make_dataset.py

train: $(VENV)/.train  ## rebuild models/intent-zh: fine-tune the e5 teacher, distil the student, export both ONNX files (~35 min, 2 cores)
	$(PY) scripts/train.py

evaluate: $(VENV)/.train  ## test-split and real-utterance figures and speed of models/intent-zh, into its model card
	$(PY) scripts/evaluate.py

bench: $(VENV)/.bench bench-peers-setup  ## the full benchmark with mosec, PyTriton and Infinity (~40 min): BENCHMARKS.md, bench/results/
	$(PY) -m bench $(ARGS)

loadtest: $(VENV)/.bench  ## load a running server: make loadtest ARGS="run --concurrency 64"
	$(PY) -m loadtest $(ARGS)

reliability: $(VENV)/.dev  ## overload, disconnect storm, shutdown, fault matrix, 10-min soak, long fuzz: RELIABILITY.md (~40 min)
	$(PY) -m bench.reliability $(ARGS)

soak: reliability  ## the 10-minute soak is part of the reliability run (one run, one RELIABILITY.md)

fuzz: $(VENV)/.dev  ## schemathesis against /openapi.json (3,000 examples per operation), then 3,000 raw HTTP requests
	$(PY) -m bench.fuzz --examples 3000
	$(PY) -m bench.http_fuzz --examples 3000

fleet: $(VENV)/.dev  ## 3 replicas behind HAProxy: rolling restart and kill -9 under load (~2 min; apt-get install haproxy)
	$(PY) -m bench.fleet $(ARGS)

scaling: $(VENV)/.dev  ## SCALING.md: workers 1 vs 2, the per-process overhead ceiling, the fleet, capacity table (~6 min)
	$(PY) -m bench.scaling $(ARGS)

# Bring your own model: tiny random transformers classifiers exported to ONNX, served, and
# checked against transformers' pipeline, in their own pinned environment (~1 GB, torch CPU).
.venv-byom/.installed: requirements-byom.txt requirements.txt
	$(PYTHON) -m venv .venv-byom
	.venv-byom/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-byom.txt
	touch $@

byom: .venv-byom/.installed  ## BERT, DistilBERT, ALBERT, RoBERTa, XLM-R... exported, served, checked against pipeline (ARGS="--only bert")
	.venv-byom/bin/python -m bench.byom $(ARGS)

wheel: $(VENV)/.dev  ## build dist/batcher-VERSION-py3-none-any.whl, the bundled model inside (~29 MB)
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir dist .

image: $(VENV)/.runtime  ## build the container image with podman (local Debian base and wheels when no registry is reachable)
	deploy/image/build.sh

image-test: image  ## build, run, probe and stop the image; checks it drained and exited 0
	$(PY) -m bench.image_test

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis dist
