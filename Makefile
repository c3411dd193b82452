# make test: set up .venv (torch CPU wheel first), install msda with test extras, run ruff and pytest.
# make demo: same set-up, then simulate + pretrain (quick) + experiment --quick + report + a 50 m map, in demo_out/.
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
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/msda simulate --out demo_out/benchmark --plots
	$(BIN)/msda pretrain --samples demo_out/benchmark/pretrain.parquet --out demo_out/weights_9km --widths 16 --epochs 2 --average-last 1
	$(BIN)/msda experiment --fine demo_out/benchmark/fine.parquet --coarse demo_out/benchmark/coarse.parquet \
		--weights demo_out/weights_9km --out demo_out/experiment --quick
	$(BIN)/msda report demo_out/experiment
	$(BIN)/msda map --weights demo_out/weights_9km --inputs demo --out demo_out/map

bench: $(STAMP)
	$(BIN)/python benchmarks/predict.py
	$(BIN)/python benchmarks/map.py

clean:
	rm -rf $(VENV) demo_out
