# enginefarm: `make demo` and `make test` are the two entry points.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first, pinned: on the farm's CPU machines this pin is the
# local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test soak clean

$(VENV)/.installed: pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11+)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m enginefarm.demo

test: venv
	$(PY) -m pytest -q --durations=20 tests

# the nightly over the whole tiny catalog, variants in parallel, forced
# ENGINEFARM_SOAK_ROUNDS times (make test runs one round over the racing recipes)
SOAK_ROUNDS ?= 3
soak: venv
	ENGINEFARM_SOAK_ROUNDS=$(SOAK_ROUNDS) $(PY) -m pytest -q tests/test_concurrency.py -k whole_tiny_catalog

clean:
	rm -rf $(VENV) .farm .demo
