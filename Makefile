PYTHON ?= python
# The torch the tests pin; on a GPU machine: make setup TORCH=torch (PyPI's Linux wheels are CUDA builds)
TORCH ?= torch==2.13.0
ARGS ?=
STUDY ?= quick

.PHONY: setup setup-dev run lint format test test-all ui list plan data analyze notebook sweep bench bench-tracking bench-analysis gpu-check services services-stop screenshots

# What running needs: torch, then the harness and its dependencies.
setup:
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e .

# Also what the tests need (pytest, transformers, the notebook kernel): the extras `.[test]`.
setup-dev: setup
	$(PYTHON) -m pip install -e ".[test]"

run:
	$(PYTHON) -m harness $(ARGS)

list:
	$(PYTHON) -m harness list

# What a trial or a study will cost, e.g. make plan ARGS="+sweep=interventions scale=gpt2_small gpu=h100"
plan:
	$(PYTHON) -m harness plan $(ARGS)

# The one style (ruff, configured in pyproject.toml); CI fails on a violation. `make format` applies it.
lint:
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .

# The suite on 3 workers, each test file on one of them (its module fixtures built once); TEST_WORKERS=0: in this process.
TEST_WORKERS ?= 3
test:
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The single-node SLURM and the PostgreSQL that tests/e2e/test_cluster_services.py needs (as root; docs/cluster.md).
services:
	bash .ci/services.sh start

services-stop:
	bash .ci/services.sh stop

test-all:
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "slow or not slow"

ui:
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

DATASET ?= fineweb_gpt2_tokens
data:
	$(PYTHON) -m pip install -e ".[data]"
	$(PYTHON) -m harness.data prepare dataset=$(DATASET) $(ARGS)

analyze:
	$(PYTHON) -m analysis study=$(STUDY) $(ARGS)

# The analysis notebook in JupyterLab (the `.[notebook]` extra), on study $(STUDY) of the project's mlflow.db:
# the same analysis as `make analyze`, logged the same way under the study's parent run.
notebook:
	$(PYTHON) -m pip install -e ".[notebook]"
	ANALYSIS_STUDY=$(STUDY) $(PYTHON) -m jupyter lab analysis/noise_analysis.ipynb

# The README's screenshots of mlflow ui (docs/img/*.png at 1366 and 1600 px): a small quick study and a smoke trial
# in a fresh store, a real `mlflow server` on 127.0.0.1, headless Chromium (tools/screenshots.py).
screenshots:
	$(PYTHON) -m pip install -e ".[screenshots]"
	$(PYTHON) tools/screenshots.py

# A study from conf/sweep/ (default `quick`: a few CPU minutes), ending with its analysis (its verdict table);
# hydra.sweeper.analyze=false leaves the analysis out.
sweep:
	$(PYTHON) -m harness +sweep=$(STUDY) $(ARGS)

# Configs side by side, e.g. make bench ARGS='compare="+intervention=bf16" compare="+intervention=no_dropout"'
bench:
	$(PYTHON) -m harness bench $(ARGS)

# The CUDA path's acceptance and speed table in one run (docs/gpu.md): make gpu-check out=DIR device=cuda|cpu
out ?= gpucheck
device ?= auto
gpu-check:
	$(PYTHON) -m harness gpu-check out=$(out) device=$(device)

bench-tracking:
	$(PYTHON) -m harness bench-tracking $(ARGS)

# Time and peak memory of one analysis of 10,000 arms x 3 seeds (arms=N seeds=N in ARGS).
bench-analysis:
	$(PYTHON) -m analysis.scaling $(ARGS)
