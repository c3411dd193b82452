# make test: set up .venv (torch CPU wheel first), install msda with test extras, run pytest.
# make demo: same set-up, then run the demo on the embedded default data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.msda-installed

.PHONY: test demo bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/msda demo --out demo_out

bench: $(STAMP)
	$(BIN)/python benchmarks/predict.py

clean:
	rm -rf $(VENV) demo_out
