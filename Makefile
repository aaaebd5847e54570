# Every target creates/reuses the local virtualenv first, so each works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
MLFLOW_DB ?= sqlite:///mlruns/mlflow.db

.PHONY: venv demo test test-fast lint ui serve bench lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Run the whole pipeline on the embedded default (no servers, no GPU). ARGS=--force retrains.
demo: $(STAMP)
	$(PY) -m flows.cli run --config $(CONFIG) $(ARGS)

## The full test suite (CI runs exactly this).
test: $(STAMP)
	$(PY) -m pytest -q

## Unit tests only (skips the end-to-end runs on the real MiniLM).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

## Browse runs, metrics, plots, artifacts and registered models.
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_DB) --host 127.0.0.1 --port 5000

## Serve the production model on http://127.0.0.1:5001 (POST /invocations).
MODEL_NAME ?= support-ticket-classifier
serve: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH MLFLOW_TRACKING_URI=$(MLFLOW_DB) \
	  $(VENV)/bin/mlflow models serve -m models:/$(MODEL_NAME)@production --env-manager local \
	  --host 127.0.0.1 --port 5001

## Stage times and orchestration overhead of one default run.
bench: $(STAMP)
	$(PY) benchmarks/pipeline_stages.py --config $(CONFIG)

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf outputs mlruns .pytest_cache
