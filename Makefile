PYTHON ?= python
# CPU wheel by default (no CUDA download); on a GPU machine: make setup TORCH=torch
TORCH ?= torch==2.13.0
ARGS ?=
STUDY ?= quick

.PHONY: setup run test test-all ui list data analyze sweep bench bench-tracking

setup:
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[test]"

run:
	$(PYTHON) -m harness $(ARGS)

list:
	$(PYTHON) -m harness list

test:
	$(PYTHON) -m pytest -q

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"

ui:
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

DATASET ?= fineweb_gpt2_tokens
data:
	$(PYTHON) -m pip install -e ".[data]"
	$(PYTHON) -m harness.data prepare dataset=$(DATASET) $(ARGS)

analyze:
	$(PYTHON) -m analysis study=$(STUDY) $(ARGS)

# A study from conf/sweep/ (default `quick`: a few CPU minutes), and its analysis.
sweep:
	$(PYTHON) -m harness +sweep=$(STUDY) $(ARGS)

bench:
	$(PYTHON) -m harness.bench $(ARGS)

bench-tracking:
	$(PYTHON) -m harness.tracking_bench $(ARGS)
