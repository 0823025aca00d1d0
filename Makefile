# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Only the dependencies change the environment; a stamp per extra set avoids reinstalling.
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test bench learn-niah learn-niah-ablations lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(BIN)/longdata build recipes/quickstart.yml
	$(BIN)/longdata train build/quickstart --split ctx16k/train --steps 20 --out runs/quickstart

test: $(STAMP_DEV)
	$(BIN)/python -m pytest -q

bench: $(STAMP_DEV)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/packing.py
	$(BIN)/python benchmarks/build.py
	$(BIN)/python benchmarks/training.py

# A tiny model learns needle retrieval from a longdata mix on CPU (docs/EVAL.md): the main run,
# 44 min measured on 2 cores; with the two ablations side by side, about 2 h (estimated).
learn-niah: $(STAMP_RUN)
	$(BIN)/python benchmarks/learn_niah.py --out runs/learn-niah-main --no-ablations --threads 2

learn-niah-ablations: $(STAMP_RUN)
	$(BIN)/python benchmarks/learn_niah.py --out runs/learn-niah --jobs 3 --threads 1

lint: $(STAMP_DEV)
	$(BIN)/ruff check longdata trainer evals tests benchmarks examples

clean:
	rm -rf build runs .longdata_cache
