# enginefarm: `make demo` and `make test` are the two entry points.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first, pinned: on the farm's CPU machines this pin is the
# local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test soak postgres clean

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

# PostgreSQL for tests/test_hosts.py (the Prefect server's database): Debian's
# package, installed once; the test makes its own cluster in a temp dir.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then echo "postgresql: installed"; else \
	  command -v apt-get >/dev/null || { echo "need PostgreSQL (Debian's postgresql package)"; exit 2; }; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; fi

# the several-hosts test with more nightlies (CI runs it with the four of `make test`)
NIGHTS ?= 10
soak: venv postgres
	ENGINEFARM_HOSTS_NIGHTS=$(NIGHTS) $(PY) -m pytest -q -s tests/test_hosts.py

clean:
	rm -rf $(VENV) .farm .demo
