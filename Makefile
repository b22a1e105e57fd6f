# The two commands of the README:
#   make serve   set up a virtual environment with the serving extra and serve the default model
#   make test    set up a virtual environment with every extra and run the test suite
#   make lint    ruff (lint and format check) and mypy, as CI runs them before the tests
#   make contract  the HTTP API against its OpenAPI document (schemathesis on a live dino serve)
# On an NVIDIA GPU: make serve SERVE_EXTRA=serve-gpu (onnxruntime-gpu instead of onnxruntime)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the releases this project is tested with
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# the service's onnxruntime: serve (onnxruntime, CPU) or serve-gpu (onnxruntime-gpu, CUDA provider).
# Both wheels install the module onnxruntime and pip would install one over the other (a mix of both):
# when the other one is installed, both are uninstalled and the wanted one installed right away
SERVE_EXTRA ?= serve
ifeq ($(filter $(SERVE_EXTRA),serve serve-gpu),)
$(error SERVE_EXTRA must be serve or serve-gpu, not '$(SERVE_EXTRA)')
endif
WANT_ORT := $(if $(filter serve-gpu,$(SERVE_EXTRA)),onnxruntime-gpu,onnxruntime)
OTHER_ORT := $(if $(filter serve-gpu,$(SERVE_EXTRA)),onnxruntime,onnxruntime-gpu)
define only-one-onnxruntime
	@if $(BIN)/python -m pip show --quiet $(OTHER_ORT) >/dev/null 2>&1; then \
	  echo "$(OTHER_ORT) is installed, the $(SERVE_EXTRA) extra wants $(WANT_ORT) (the same module): swapping them"; \
	  $(BIN)/python -m pip uninstall --quiet --yes onnxruntime onnxruntime-gpu && $(BIN)/pip install --quiet $(WANT_ORT); \
	fi
endef

.PHONY: serve test lint contract install-serve install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install-serve: $(BIN)/python
	$(only-one-onnxruntime)
	$(BIN)/pip install --quiet -e '.[$(SERVE_EXTRA)]'

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(only-one-onnxruntime)
	$(BIN)/pip install --quiet -e '.[train,$(SERVE_EXTRA),milvus,embed,ray,client,video,dev]'

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
