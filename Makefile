# Two targets a new user needs: `make run` (train + sample on CPU) and `make test`.
# Both create .venv on first use with a Python >= 3.12 found on PATH, then in pyenv.
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: run test gpu-test clean
run: $(VENV)/.installed
	$(PY) -m experiments.train --config experiments/configs/shakespeare.yaml $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -n $(JOBS) $(ARGS)

$(VENV)/.installed: pyproject.toml
	@set -e; py=""; \
	for c in python3.12 python3.13 python3 python; do \
	  if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py=$$(command -v $$c); break; fi; \
	done; \
	if [ -z "$$py" ] && command -v pyenv >/dev/null 2>&1; then \
	  for v in $$(pyenv versions --bare | grep '^3\.12\.' | sort -rV) $$(pyenv versions --bare | sort -rV); do \
	    c="$$(pyenv root)/versions/$$v/bin/python3"; \
	    if [ -x "$$c" ] && "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then py="$$c"; break; fi; \
	  done; \
	fi; \
	if [ -z "$$py" ]; then echo "error: llmjax needs Python >= 3.12; none found on PATH or in pyenv. Install one (e.g. 'pyenv install 3.12') and retry." >&2; exit 1; fi; \
	echo "using $$py ($$($$py --version))"; \
	[ -x $(PY) ] || "$$py" -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip; \
	$(PY) -m pip install -q -e '.[dev]'; \
	touch $@

# On a GPU machine whose Python already has the pinned stack and no network: the GPU tests,
# with the wheels carried in .whl/ (the optional jax-triton) installed there first, without deps.
# GPU_JOBS test processes share the GPU (each allocates only what it needs: conftest.py).
GPU_PY ?= python
GPU_JOBS ?= 8
gpu-test:
	@set -e; site=""; \
	if ls .whl/*.whl >/dev/null 2>&1; then \
	  $(GPU_PY) -m pip install -q --no-deps --no-index --upgrade --target .whl/site .whl/*.whl; site=$(CURDIR)/.whl/site; \
	fi; \
	PYTHONPATH=$$site$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m pytest -m gpu -n $(GPU_JOBS) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
