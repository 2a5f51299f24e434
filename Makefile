# enginefarm: `make demo` and `make test` are the two entry points.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first, pinned: on the farm's CPU machines this pin is the
# local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test clean

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

clean:
	rm -rf $(VENV) .farm .demo
