# fusionrec: `make run` serves the demo, `make test` runs the tests. Both install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run serve test test-unit test-integration proto proto-check proto-lint proto-baseline wheel-check clean eval eval-ml100k bench bench-gpu bench-train observe prometheus-bin reliability

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

proto-check: install proto-lint
	$(PY) protos/codegen.py --check

# buf (pinned PyPI buf-bin): lint the public API, and fail on changes that break v1 callers (against the
# released API in protos/api-baseline.json; additions pass).
proto-lint: install
	cd protos && $(CURDIR)/$(VENV)/bin/buf lint . && $(CURDIR)/$(VENV)/bin/buf breaking . --against api-baseline.json
	@echo "proto-lint: buf lint and buf breaking (against protos/api-baseline.json) pass"

# Only for a deliberate new API version: the current .proto becomes the baseline buf breaking checks against.
proto-baseline: install
	cd protos && $(CURDIR)/$(VENV)/bin/buf build . --exclude-source-info -o -#format=json \
		| $(CURDIR)/$(PY) -c "import json, sys; print(json.dumps(json.load(sys.stdin), indent=1, sort_keys=True))" \
		> api-baseline.json

# tests/integration/test_metrics_prometheus.py runs a real Prometheus server (Debian's package, 2.42).
prometheus-bin:
	@command -v prometheus > /dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)

test: install proto-check prometheus-bin
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

# The whole performance harness in one run (~23 min, the autoscaling ramp included): bench/results/summary.json + PNGs;
# then Recommend with and without the ranking stage at 100k items (bench/results/ranking.json: engine level, then
# Recommend over gRPC against the real app, ranking off/on twice; ~15 min).
bench: install
	$(VENV)/bin/fusionrec bench all
	$(VENV)/bin/fusionrec bench ranking

# Encoders on CUDA with fractional GPUs (deploy/gpu.yaml), same ratios; needs a GPU machine.
bench-gpu: install
	$(VENV)/bin/fusionrec bench all --config deploy/gpu.yaml --retrieval-sizes ""

# The built wheel, not the editable install: a fresh venv, every module imports, the CLI runs (~2 min).
WHEEL_DIR := build/wheel-check
wheel-check: install
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEEL_DIR) .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install -q pip==25.3
	$(WHEEL_DIR)/venv/bin/python -m pip install -q -c requirements.lock $(WHEEL_DIR)/fusionrec-*.whl
	cd /tmp && $(CURDIR)/$(WHEEL_DIR)/venv/bin/python $(CURDIR)/.ci/wheel_imports.py
	cd /tmp && $(CURDIR)/$(WHEEL_DIR)/venv/bin/fusionrec --help > /dev/null
	cd /tmp && $(CURDIR)/$(WHEEL_DIR)/venv/bin/fusionrec bench --help > /dev/null
	rm -rf $(WHEEL_DIR) build/lib build/bdist.*
	@echo "wheel-check: fusionrec --help and fusionrec bench --help run from the installed wheel"

# A real Prometheus (Debian: apt-get install -y prometheus) scraping a running `make run` / `fusionrec serve`
# at 127.0.0.1:9464 with deploy/prometheus.yml; its UI and query API at http://127.0.0.1:$(PROMETHEUS_PORT).
PROMETHEUS_PORT ?= 9090
observe: prometheus-bin
	prometheus --config.file=deploy/prometheus.yml --storage.tsdb.path=.fusionrec/prometheus \
		--web.listen-address=127.0.0.1:$(PROMETHEUS_PORT)

clean:
	rm -rf .fusionrec

# Trains every variant on lfm2k (3 seeds each: the full model, the ablations, the other user tower, LightGCN), tests the
# full model against its best single modality and best peer (paired over users), writes reports/quality/lfm2k.{json,md,png};
# then the full pipeline (the served 4-net retrieval model, the LightGBM ranker, MMR with λ chosen on valid) against
# retrieval-only -> reports/quality/ranking-lfm2k.{json,md,png}. An interrupted run resumes: finished training jobs are
# kept in .fusionrec/cache/quality-jobs (the ranking protocol reuses the full model's nets from there).
eval: install
	$(VENV)/bin/fusionrec evaluate --dataset lfm2k
	$(VENV)/bin/fusionrec eval-ranking --dataset lfm2k --members 4

# The same on MovieLens 100K with the setting chosen on valid for its chronological split (GRU user tower, every
# training user split chronologically) -> reports/quality/ml-100k.* and ranking-ml-100k.*.
ML100K_SET := --set user_tower=gru --set prefix_share=1.0
eval-ml100k: install
	$(VENV)/bin/fusionrec evaluate --dataset ml-100k $(ML100K_SET)
	$(VENV)/bin/fusionrec eval-ranking --dataset ml-100k --members 4 $(ML100K_SET)

# Training at catalog scale on synthetic data (100k items, 1M interactions; ~5 min, no service needed):
# seconds per epoch, graph build, peak RSS -> bench/results/train_scale.json.
bench-train: install
	$(VENV)/bin/fusionrec bench train

# Hostile input, kill -9 of every deployment's replica and of the whole tree under load, 2x overload and a
# 10-minute soak on a fresh service (~20 min): reports/reliability.{json,md,png}. SOAK_S=60 for a short run.
SOAK_S ?= 600
reliability: install
	$(VENV)/bin/fusionrec bench reliability --soak-s $(SOAK_S) --out-dir reports
