# Two commands do everything on a fresh machine:
#   make demo   - create the venv if missing, install, run a real nightly export on the embedded default
#   make test   - same environment, the whole test suite (lint, compose schema, unit, end-to-end)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
REQS := requirements.txt requirements/engine-cpu.txt requirements/dev.txt requirements/constraints.txt
STAMP := $(VENV)/.install-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint compose-check bench lock clean

$(PY):
	@echo ">>> creating virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --upgrade pip

# Re-installs only when a requirements file changed (idempotent, seconds when up to date).
$(STAMP): $(REQS) | $(PY)
	@echo ">>> [1/2] torch 2.13.0 CPU wheel first (anything else would pull a multi-GB CUDA build)"
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
		|| $(PIP) install --progress-bar off torch==2.13.0
	@echo ">>> [2/2] Airflow 3.3.2 + providers, export engine (ONNX, onnxruntime, GX), test tools (~3 min on a fresh machine)"
	$(PIP) install --progress-bar off -c requirements/constraints.txt \
		-r requirements.txt -r requirements/engine-cpu.txt -r requirements/dev.txt \
		| grep -E --line-buffered '^(Collecting|Successfully|ERROR)' | sed -u 's/^/    /' ; test $${PIPESTATUS[0]} -eq 0
	@$(PIP) check
	@touch $(STAMP)
	@echo ">>> environment ready"

install: $(STAMP)

demo: install
	$(PY) scripts/demo.py

lint: install
	$(VENV)/bin/ruff check .

compose-check: install
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yaml

test: install lint compose-check
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_variants.py

lock: install
	@{ echo "# Full resolved set (our lock; the Airflow constraints file cannot be fetched here). Regenerate with make lock."; \
	  $(PIP) freeze --exclude-editable | sed -E 's/^torch==2.13.0\+cpu/torch==2.13.0/'; } > requirements/constraints.txt

clean:
	rm -rf .demo .airflow .pytest_cache .ruff_cache
