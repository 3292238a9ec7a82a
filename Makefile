# `make demo` and `make test` work on a fresh machine with Python 3.10-3.13: they build $(VENV)
# from pyproject.toml first, at the exact versions CI tested ($(CONSTRAINTS)). The second CI
# suite: make test PYTHON=python3.12 VENV=.venv312 CONSTRAINTS=.ci/constraints-py312.txt
# CONSTRAINTS= (empty) installs from pyproject's ranges alone; PIP_ARGS adds pip options
# (CI: --no-index --find-links WHEELHOUSE, so nothing is downloaded twice).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= .ci/constraints-py311.txt
PIP_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds its ops under a file lock in $TORCH_EXTENSIONS_DIR, by default the
# machine-wide ~/.cache/torch_extensions, where a killed build's lock stalls every venv: ours
# builds none on the training path, and whatever builds goes to a directory of this venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install test demo demo-quick
install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_ARGS) -e '.[dev]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) launch/demo.py

demo-quick: $(STAMP)
	$(PY) launch/demo.py --quick
