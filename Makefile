# Two commands set up a fresh clone:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.5,<2.15"
	$(BIN)/pip install -q -e ".[all]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/openbagel demo --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout 900 tests

.PHONY: venv demo test
