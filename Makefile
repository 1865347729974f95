# MedSeg: quick start
#   make demo   set up a virtual environment and segment the bundled sample with the bundled model
#   make test   set up and run the test suite
#
# Variables: PYTHON (the interpreter that creates the environment), VENV (the environment; point it at an
# existing one to keep the torch you have, e.g. a CUDA build), TORCH_SPEC (what to install when the
# environment has no torch; the default is the CPU build this project is tested with), TORCH_INDEX (empty by
# default; when set, the package index that torch alone is installed from, e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build where PyPI's torch is the multi-GB CUDA one).

PYTHON ?= python3
DEFAULT_VENV := .venv
VENV ?= $(DEFAULT_VENV)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed

.PHONY: setup demo test lint models train-hippocampus clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Install torch first, and only when absent, so that pip never swaps in a multi-GB CUDA build
	# behind a user's back and users with a GPU build keep theirs.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
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

# Reproduces the bundled hippocampus-mri 2.0.0 the way it was made, from ../shared/data/msd_hippocampus: the 5-fold
# cross-validation of training/configs/hippocampus-dynunet-cpu.json, then the best fold (fold 0) shipped with its CV
# Dice and int8 weights into runs/hippocampus-dynunet-cpu/model. About 40 minutes per fold on 2 CPU cores with AMX
# (its bfloat16 needs AMX or AVX-512-BF16, or a GPU); finished folds are skipped, so rerunning it continues.
# Resources/Models/ is never written: copying a new model there is a deliberate step (training/README.md).
train-hippocampus: setup
	$(PY) -m training.crossval training/configs/hippocampus-dynunet-cpu.json --tta --ship --weights int8

# Removes the default environment (.venv) only; an environment given as VENV=... is yours and is kept.
clean:
	rm -rf $(DEFAULT_VENV) medseg-demo .pytest_cache .ruff_cache
	rm -f $(STAMP)
