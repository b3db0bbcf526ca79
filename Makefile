# fp8exp: `make help` lists the targets. Everything runs from the project's own virtualenv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 5000

.DEFAULT_GOAL := help
.PHONY: help install run test report bench bench-infer ui lock clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv (if missing) and install fp8exp with pinned dependencies

run: $(STAMP) ## Train, evaluate and track the default experiment; overrides via ARGS="precision=float8 ..."
	$(PY) -m fp8exp $(ARGS)

test: $(STAMP) ## Run the test suite (CPU only)
	$(PY) -m pytest $(ARGS)

report: $(STAMP) ## Compare the latest sweep (table, plots, logged on its parent run); ARGS="--parent RUN_ID"
	$(PY) -m fp8exp.report $(ARGS)

bench: $(STAMP) ## Run the benchmarks on this machine and rewrite docs/benchmarks.md (~15 min on 2 cores)
	$(PY) -m benchmarks.run $(ARGS)

bench-infer: $(STAMP) ## Inference latency and FP8 vs INT8 post-training accuracy of the latest sweep's models; ARGS="run_id=..."
	$(PY) -m fp8exp.infer_bench $(ARGS)

ui: $(STAMP) ## Open the MLflow UI on the default store (http://127.0.0.1:5000)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(HOST) --port $(PORT)

lock: ## Re-resolve dependencies and rewrite constraints.txt
	rm -rf $(VENV).lock && $(PYTHON) -m venv $(VENV).lock
	$(VENV).lock/bin/pip install --quiet -e ".[dev]"
	$(VENV).lock/bin/pip freeze --exclude-editable > constraints.txt && rm -rf $(VENV).lock

clean: ## Remove outputs of local runs (keeps mlflow.db and .venv)
	rm -rf outputs multirun/20* .pytest_cache
