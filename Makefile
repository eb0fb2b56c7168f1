# `make train` and `make test` set up .venv on first use, then run. ARGS passes flags through:
#   make train ARGS="--trainer.max_epochs=3"      make test ARGS="-m 'not slow'"
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The torch pair this template is tested with; any torch >= 2.5 with its torchvision works.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup train test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $@

train: setup
	$(PYTHON) train.py $(ARGS)

test: setup
	$(PYTHON) -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
