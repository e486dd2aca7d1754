# Two commands do all set-up:  `make run` (the main job) and `make test` (the test suite).
# Where python3 lacks torch/triton/pytest, each creates .venv on first use and installs the CPU
# build of torch into it (pinned: an unpinned torch pulls gigabytes of CUDA packages).

PYTHON ?= python3
VENV   ?= .venv
TORCH_CPU ?= torch==2.13.0
TRITON_PIN ?= triton==3.6.0

# A python that already holds torch + triton + pytest (a GPU node's) is used as it is: a venv
# made from it would not see its packages when it is itself a venv.
HAVE_STACK := $(shell $(PYTHON) -c "import torch, triton, pytest" 2>/dev/null && echo yes)
ifeq ($(HAVE_STACK),yes)
PY    := $(PYTHON)
READY :=
else
PY    := $(VENV)/bin/python
READY := $(VENV)/.ready
endif

.PHONY: run test test-cpu test-compiled lint clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_PIN)"
	$(PY) -m pip install -q -e ".[test,dev]"
	touch $@

run: $(READY)
	$(PY) -m megakernel

lint: $(READY)
	@if $(PY) -c "import ruff" 2>/dev/null; then \
	  $(PY) -m ruff check . && $(PY) -m ruff format --check .; \
	else echo "ruff is not installed here: lint skipped (CI runs it)"; fi

# tests/cpu run under the Triton interpreter; tests/compile compile every kernel for sm_90 (no
# GPU needed); tests/gpu and tests/dist skip themselves without GPUs.
# pytest exit code 5 means no test was collected: for this suite that is a failure.
test: lint test-cpu test-compiled

# The interpreter runs one core's worth of numpy: with pytest-xdist, one worker per core (up to 4).
test-cpu: $(READY)
	workers=$$($(PY) -c "import os, xdist; print('-n', min(os.cpu_count() or 1, 4))" 2>/dev/null); \
	TRITON_INTERPRET=1 $(PY) -m pytest tests/cpu -q $$workers; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no CPU tests"; fi; exit $$rc

test-compiled: $(READY)
	$(PY) -m pytest tests/compile tests/gpu tests/dist -q -rs; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no compiled-kernel tests"; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
