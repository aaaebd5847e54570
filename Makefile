# Every target creates/reuses the local virtualenv first, so each works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
MLFLOW_DB ?= sqlite:///mlruns/mlflow.db
MLFLOW_ARTIFACTS ?= mlruns/artifacts
# `make up`: local Prefect + MLflow servers (flows/stack.py); state, logs, PREFECT_HOME in STACK_DIR
STACK_DIR ?= .stack
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
STACK := $(PY) -m flows.stack --dir $(STACK_DIR) --prefect-port $(PREFECT_PORT) \
  --mlflow-port $(MLFLOW_PORT) --backend-store-uri $(MLFLOW_DB) --artifacts $(MLFLOW_ARTIFACTS)

.PHONY: venv demo test test-fast lint ui up down status serve bench lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Run the whole pipeline on the embedded default (no servers, no GPU). ARGS=--force retrains.
## After `make up` its flow run goes to that Prefect server (else Prefect's temporary one).
demo: $(STAMP)
	env $$($(STACK) env) $(PY) -m flows.cli run --config $(CONFIG) $(ARGS)

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

## Start a local Prefect server (UI :4200) and MLflow server (:5000, the store `make demo` writes).
up: $(STAMP)
	$(STACK) up

## Stop both (SIGTERM, grace, SIGKILL); nothing is left running.
down: $(STAMP)
	$(STACK) down

status: $(STAMP)
	$(STACK) status

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
