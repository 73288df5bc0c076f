# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch goes in first and explicitly: a bare `torch` requirement pulls a multi-GB CUDA build.
# CUDA users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv test bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed-dev

test: venv
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/bench_clip.py

bench-quick: venv
	$(PY) benchmarks/bench_clip.py --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
