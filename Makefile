# `make train` and `make test` set up .venv on first use, then run. ARGS passes flags through:
#   make train ARGS="--trainer.max_epochs=3"      make test ARGS="-m 'not slow'"
# train installs what training needs; test adds the dev extras (pytest, ruff, timm, ONNX).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The torch pair this template is tested with (pyproject.toml's bounds).
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup train test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $@

train: setup
	$(PYTHON) train.py $(ARGS)

test: $(VENV)/.installed-dev
	$(PYTHON) -m pytest $(ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
