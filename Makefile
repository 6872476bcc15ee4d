PYTHON ?= python
# CPU wheel by default (no CUDA download); on a GPU machine: make setup TORCH=torch
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: setup run test test-all ui list data analyze

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

DATASET ?= fineweb
data:
	$(PYTHON) -m pip install -e ".[data]"
	$(PYTHON) -m harness.data prepare dataset=$(DATASET) $(ARGS)

STUDY ?= interventions
analyze:
	$(PYTHON) -m analysis study=$(STUDY) $(ARGS)
