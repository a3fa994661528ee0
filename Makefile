# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: demo test lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/rareaug demo

test: $(VENV)/.installed-dev
	$(VENV)/bin/python -m pytest -q

# ruff (rules in pyproject.toml: errors, style, import order, a complexity limit) and the import contracts
# (stages never import each other; library modules never import a stage).
lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check rareaug data_adapters tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs
