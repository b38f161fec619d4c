# The two commands of the README: `make run` (the pipeline on the embedded demo data) and
# `make test`. Both create .venv from pyproject.toml's pins when it is missing or stale.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 5000
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := true

.PHONY: venv run test test-fast lint ui plots bench bench-scale clean-venv server server-stop remote

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,team]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	dvc repro

lint: $(STAMP)
	ruff check .

test: lint
	$(PY) -m pytest

# Everything but the tests marked slow (end-to-end dvc repro, HTTP serving, torch.compile,
# learning to an accuracy, anything that starts a fresh interpreter); docs/figures.md has its time.
# It prints its ten slowest tests: one that outgrows this lane shows at once.
test-fast: lint
	$(PY) -m pytest -m "not slow" --durations=10

# The MLflow UI on the project's own store (one worker, no job runner: starts in seconds);
# prints the experiment's runs table and the registered model's page in model-training mode
# (opens them where a desktop browser exists). Ctrl-C stops it.
ui: $(STAMP)
	$(PY) -m pipeline ui --port $(PORT)

# `dvc plots show` with vega inlined (DVC's page loads it from a CDN: blank offline).
plots: $(STAMP)
	test -f .cache/dvc-plots-offline.html || $(PY) scripts/offline_plots_template.py
	dvc plots show --html-template .cache/dvc-plots-offline.html -o dvc_plots

# Speed figures (scripts/benchmark.py; docs/figures.md has them): extraction against the GEMM
# ceiling, head epochs, the train stage against the naive approach, three head-only `dvc exp
# run`s (the last left applied to the workspace) and a queued sweep of 8 (`dvc queue start
# -j 2`), and a first `dvc repro` step by step in a scratch clone (scripts/run_breakdown.py).
# About 11 minutes on 2 CPU cores, after `make run`.
bench: $(STAMP)
	$(PY) scripts/benchmark.py

# The real pipeline, stage by stage, in scratch clones at ~1,000, 10,000 and Food-101's
# full size (14-25 min on 2 CPU cores, docs/figures.md): time per image, peak RSS, disk
# added; writes docs/scale/bench_scale.{csv,png}. SIZES=1k,10k for the two small ones.
SIZES ?= 1k,10k,full
bench-scale: $(STAMP)
	$(PY) scripts/bench_scale.py --sizes $(SIZES)

clean-venv:
	rm -rf $(VENV)

# The team setup (docs/team.md): PostgreSQL + `mlflow server` with proxied artifacts,
# in the background, data in $(TEAM_DIR) (git-ignored, survives restarts). AUTH=1: MLflow's
# basic-auth app. HOST=0.0.0.0 to serve other machines (with AUTH=1).
TEAM_DIR    ?= .team
SERVER_PORT ?= 5005
HOST        ?= 127.0.0.1
server: $(STAMP)
	$(PY) -m pipeline.team start --data $(TEAM_DIR) --host $(HOST) --port $(SERVER_PORT) \
	  $(if $(filter 1 yes true,$(AUTH)),--auth)
	@MLFLOW_TRACKING_URI=http://$(if $(filter 0.0.0.0,$(HOST)),127.0.0.1,$(HOST)):$(SERVER_PORT) \
	  $(if $(filter 1 yes true,$(AUTH)),MLFLOW_TRACKING_USERNAME=$${MLFLOW_TRACKING_USERNAME:-admin} \
	  MLFLOW_TRACKING_PASSWORD=$${MLFLOW_TRACKING_PASSWORD:-$$(cat $(TEAM_DIR)/auth/admin_password)}) \
	  $(PY) -m pipeline ui-links 2>/dev/null || true

server-stop: $(STAMP)
	$(PY) -m pipeline.team stop --data $(TEAM_DIR)

# This clone's default DVC remote (.dvc/config.local): a folder outside the repository.
DIR ?= $(abspath $(CURDIR)/..)/food101-dvc-remote
remote: $(STAMP)
	$(PY) -m pipeline.team remote $(DIR)
