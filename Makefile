# The two commands of the README:
#   make serve   set up a virtual environment with the serving extra and serve the default model
#   make test    set up a virtual environment with every extra and run the test suite
#   make lint    ruff (lint and format check) and mypy, as CI runs them before the tests
#   make contract  the HTTP API against its OpenAPI document (schemathesis on a live dino serve)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the releases this project is tested with
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: serve test lint contract install-serve install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install-serve: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[serve]'

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[train,serve,milvus,embed,ray,client,video,dev]'

serve: install-serve
	$(BIN)/dino serve

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

contract: install-dev
	$(BIN)/python tests/contract/run_schemathesis.py

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
