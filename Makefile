# Sekisho: the two quickstart commands are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
INSTANCE ?= instance
HTTPS_PORT ?= 8443
BIN := $(VENV)/bin

.PHONY: run test setup setup-test system-deps lint bench clean

$(BIN)/sekisho: pyproject.toml
	$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null \
		|| bash scripts/install-system-deps.sh --minimal
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/sekisho

system-deps:
	bash scripts/install-system-deps.sh

## Set up, create a demo instance (once) and run the gateway in the foreground.
run: setup
	$(BIN)/sekisho init $(INSTANCE) --https-port $(HTTPS_PORT)
	$(BIN)/sekisho serve --config $(INSTANCE)/sekisho.toml

## Set up (system packages for the real peers, Python packages) and run every test.
test: system-deps setup
	$(BIN)/python -m pytest -ra

lint: setup
	$(BIN)/ruff check gateway pki media signing tests bench

clean:
	rm -rf $(VENV) .pytest_cache
