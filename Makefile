# sdpo — stepwise DPO (sDPO) from the command line.
#   make demo   run sDPO end to end on the embedded default (no download)
#   make test   run the test suite
# Both create or reuse .venv; torch is installed as a CPU build only where no torch is present.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast lint demo clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A bare `torch` requirement would pull a multi-GB CUDA build: take the CPU build where none is present.
	@#   (GPU users: install your torch into $(VENV) first, or point VENV at an environment that has it.)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check sdpo_cli tests

clean:
	rm -rf runs/demo .pytest_cache
