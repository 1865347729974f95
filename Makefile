# MedSeg: quick start
#   make demo   set up a virtual environment and segment the bundled sample with the bundled model
#   make test   set up and run the test suite
#
# Variables: PYTHON (the interpreter that creates the environment), VENV (the environment; point it at an
# existing one to keep the torch you have, e.g. a CUDA build), TORCH_SPEC (what to install when the
# environment has no torch; the default is the CPU build this project is tested with).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed

.PHONY: setup demo test lint models train-hippocampus sample clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Install torch first, and only when absent, so that pip never swaps in a multi-GB CUDA build
	# behind a user's back and users with a GPU build keep theirs.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/medseg demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check MedSegExtension training Testing benchmarks Resources

models: setup
	$(VENV)/bin/medseg models

# Re-creates Resources/Models/hippocampus-mri from ../shared/data/msd_hippocampus (about 30 minutes on 2 CPU cores).
train-hippocampus: setup
	$(PY) -m training training/configs/hippocampus.json

clean:
	rm -rf $(VENV) medseg-demo .pytest_cache .ruff_cache
