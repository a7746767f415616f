# The two commands a new machine needs (see README): `make demo` and `make test`.
# Each creates .venv and installs what it needs. PYTHON may point at any Python >= 3.10.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-zoo bench-latency bench-quality clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.core constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/diprune demo

test: $(VENV)/.test
	$(PY) -m pytest -q

test-zoo: $(VENV)/.test
	$(PY) -m pytest -q -m zoo

clean:
	rm -rf $(VENV) work
