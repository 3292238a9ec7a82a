# `make demo` and `make test` work on a fresh machine with Python 3.10-3.13: they build $(VENV)
# from pyproject.toml first, at the exact versions CI tested ($(CONSTRAINTS)). `make test` runs
# the files on JOBS pytest workers (a file to a worker: its shared runs are made once); `make
# test-quick` is the quick loop (`-m "not slow"`); `make test-megatron` runs only what can differ
# between Megatron-Core versions, CI's second suite: make test-megatron PYTHON=python3.12
# VENV=.venv312 CONSTRAINTS=.ci/constraints-py312.txt
# PYTHON is a command, a path, or a version pyenv has installed but not activated (python3.12
# under a pyenv whose global is 3.11). CONSTRAINTS= (empty) installs from pyproject's ranges
# alone; PIP_ARGS adds pip options (CI: --no-index --find-links WHEELHOUSE, so nothing is
# downloaded twice; a CPU machine: --extra-index-url https://download.pytorch.org/whl/cpu).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= .ci/constraints-py311.txt
PIP_ARGS ?=
JOBS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds its ops under a file lock in $TORCH_EXTENSIONS_DIR, by default the
# machine-wide ~/.cache/torch_extensions, where a killed build's lock stalls every venv: ours
# builds none on the training path, and whatever builds goes to a directory of this venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install test test-quick test-megatron demo demo-quick
install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || { \
	  py=$$($(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null \
	    || ls -d "$$(pyenv root 2>/dev/null)"/versions/$(patsubst python%,%,$(notdir $(PYTHON)))*/bin/python 2>/dev/null | sort -V | tail -1); \
	  test -n "$$py" || { echo "make: cannot run $(PYTHON); give PYTHON=/path/to/python3.X"; exit 1; }; \
	  echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); }
	@echo "installing lws-megatron[dev] into $(VENV): torch, megatron-core, DeepSpeed, transformers," \
	  "lm-eval, wandb and ~150 more packages$(if $(CONSTRAINTS), at the versions of $(CONSTRAINTS),)" \
	  "(2-3 minutes the first time)"
	@$(if $(CONSTRAINTS),,command -v nvidia-smi >/dev/null || echo "note: no GPU here, and the" \
	  "registry's torch is the CUDA build (several GB); for the CPU build add" \
	  "PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'")
	$(PY) -m pip install --quiet $(PIP_ARGS) -e '.[dev]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@echo "installed: $$($(PY) -m pip list 2>/dev/null | tail -n +3 | wc -l) packages in $(VENV)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 -n $(JOBS) --dist loadfile --no-loadscope-reorder

test-quick: $(STAMP)
	$(PY) -m pytest -q --durations=25 -m "not slow"

test-megatron: $(STAMP)
	$(PY) -m pytest -q --durations=25 -m megatron_versions

demo: $(STAMP)
	$(PY) launch/demo.py

demo-quick: $(STAMP)
	$(PY) launch/demo.py --quick
