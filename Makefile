# Two targets a new user needs: `make run` (train + sample on CPU) and `make test`.
# Both create .venv on first use with a Python >= 3.12 found on PATH, then in pyenv.
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: run test clean
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

clean:
	rm -rf $(VENV) runs .pytest_cache
