# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch goes in first and explicitly: a bare `torch` requirement pulls a multi-GB CUDA build.
# CUDA users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo browser test wheel-check bench bench-quick lab clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

$(VENV)/.installed-report: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[report]"
	@touch $@

venv: $(VENV)/.installed-dev

# The main job: a deliberately sick network is diagnosed, the remedies are tried, the best one trains.
demo: $(VENV)/.installed-report
	$(VENV)/bin/gradguard demo

# The full lab (every textbook claim; measured 4 min 29 s on 2 cores, see README): lab-out/report.html
lab: $(VENV)/.installed-report
	$(VENV)/bin/gradguard lab -o lab-out

# Headless Chromium (Debian's package) for the tests that open the HTML reports as a person would.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing chromium (apt-get) for the HTML report tests"; \
	      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else echo "note: chromium is missing and cannot be installed here; browser tests will skip (and fail under CI)"; fi; }

test: venv browser
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# The package as `pip install` users get it: build the wheel, install it (not editable) with its
# `report` extra into a fresh venv (torch first, as above; pip reuses its cache or a local wheel),
# and run `gradguard demo --quick` from there, outside the source tree.
WHEEL_VENV ?= .wheel-venv
wheel-check: | $(PY)
	rm -rf dist $(WHEEL_VENV)
	$(PY) -m pip wheel --no-deps -q -w dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(WHEEL_VENV)/bin/python -m pip install -q "$$(ls dist/gradguard-*.whl)[report]"
	cd $(WHEEL_VENV) && env -u PYTHONPATH bin/python -c "import gradguard, sys; \
	  sys.exit('gradguard imported from ' + gradguard.__file__) if 'site-packages' not in gradguard.__file__ else None"
	cd $(WHEEL_VENV) && env -u PYTHONPATH bin/gradguard demo --quick -o demo-out

bench: venv
	$(PY) benchmarks/bench_clip.py
	$(PY) benchmarks/bench_guard.py

bench-quick: venv
	$(PY) benchmarks/bench_clip.py --quick
	$(PY) benchmarks/bench_guard.py --quick

clean:
	rm -rf $(VENV) $(WHEEL_VENV) build dist src/*.egg-info .pytest_cache
