# Wardgate entry points. `make demo` runs the gateway on embedded defaults; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
IDP    := tests/idp/node_modules/.package-lock.json
AXE    := tests/browser/node_modules/.package-lock.json
NODEPG := tests/clients/node_modules/.package-lock.json

.PHONY: demo test test-fast bench soak lint setup system-deps system-deps-test system-deps-bench clean

demo: system-deps setup
	$(PY) -m wardgate.demo

test: system-deps-test setup $(IDP) $(AXE) $(NODEPG)
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest tests/unit

bench: system-deps-bench setup
	$(PY) bench/run.py

# The long attack suite: fuzzing, hostile input, every client, faults, 200 sessions of load; a summary
# table, also written to .soak/report.md.
soak: system-deps-test setup $(IDP) $(AXE) $(NODEPG)
	$(PY) -m pip install -q -e '.[test,soak]'
	$(PY) soak/run.py

lint: setup
	$(VENV)/bin/ruff check wardgate tests bench soak

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py wardgate/engines/postgres/_wire.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The tests' OpenID provider (npm oidc-provider), installed into a folder git ignores.
$(IDP): tests/idp/package-lock.json
	cd tests/idp && npm ci --no-audit --no-fund --loglevel=error

# axe-core, the accessibility checker the console's browser tests inject into its pages.
$(AXE): tests/browser/package-lock.json
	cd tests/browser && npm ci --no-audit --no-fund --loglevel=error

# The Node.js pg driver, one of the clients the tests drive through the gateway.
$(NODEPG): tests/clients/package-lock.json
	cd tests/clients && npm ci --no-audit --no-fund --loglevel=error

system-deps:
	@scripts/system-deps.sh

system-deps-test:
	@scripts/system-deps.sh test

system-deps-bench:
	@scripts/system-deps.sh bench

clean:
	rm -rf $(VENV) .demo build *.egg-info wardgate/engines/postgres/*.so
