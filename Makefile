# The two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VAR ?= var

.PHONY: run test venv test-deps clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

$(VAR)/tmmail.toml: | $(VENV)/.installed
	$(VENV)/bin/tmmail init $(VAR) --hostname localhost --domain example.com

run: $(VENV)/.installed $(VAR)/tmmail.toml
	$(VENV)/bin/twistd -n --pidfile= tmmail --config $(VAR)/tmmail.toml

test-deps:
	./scripts/install-test-deps.sh

test: $(VENV)/.installed test-deps
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	@echo "see bench/README.md"

clean:
	rm -rf $(VENV) build *.egg-info
