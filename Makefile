# fusionrec: `make run` serves the demo, `make test` runs the tests. Both install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run serve test test-unit test-integration proto proto-check clean

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

clean:
	rm -rf .fusionrec
