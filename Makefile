# `make demo` and `make test` work on a fresh machine with Python 3.10/3.11: they build .venv
# from pyproject.toml first. GPU users: install their CUDA build of torch 2.13.0 into .venv
# before `make install` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-quick
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) launch/demo.py

demo-quick: $(STAMP)
	$(PY) launch/demo.py --quick
