# fusionrec: `make run` serves the demo, `make test` runs the tests. Both install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run serve test test-unit test-integration proto proto-check clean eval bench bench-gpu

install: $(STAMP)

# Reinstalls only when the pins change; safe to rerun.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==25.3
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

run: install
	$(VENV)/bin/fusionrec demo

serve: install
	$(VENV)/bin/fusionrec serve

proto: install
	$(PY) protos/codegen.py

proto-check: install
	$(PY) protos/codegen.py --check

test: install proto-check
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

# The whole performance harness in one run (~20 min): bench/results/summary.json + PNGs.
bench: install
	$(VENV)/bin/fusionrec bench all

# Encoders on CUDA with fractional GPUs (deploy/gpu.yaml), same ratios; needs a GPU machine.
bench-gpu: install
	$(VENV)/bin/fusionrec bench all --config deploy/gpu.yaml --retrieval-sizes ""

clean:
	rm -rf .fusionrec

# Trains every variant on lfm2k (3 seeds for the full model) and writes reports/quality/lfm2k.{json,md,png}.
eval: install
	$(VENV)/bin/fusionrec evaluate --dataset lfm2k
