# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Only the dependencies change the environment; a stamp per extra set avoids reinstalling.
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test test-tf4 bench learn-niah learn-niah-ablations learn-ruler s2-niah lint clean

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
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python -m pytest -q

# The second transformers line: 4.57 (the last 4.x; it needs huggingface-hub<1, so pip settles
# datasets below 5.1) beside an older torch, for the tests that touch transformers or torch's
# attention APIs. .ci/run runs it after `make test`.
VENV_TF4 := .venv-tf4
TF4_TESTS := tests/test_templates.py tests/test_template_matrix.py tests/test_attention.py \
	tests/test_eval.py tests/test_loop.py tests/test_collate.py tests/test_loss.py \
	tests/test_hf_trainer.py tests/test_memory.py
$(VENV_TF4)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/pip install -q --upgrade pip
	$(VENV_TF4)/bin/pip install -q 'torch==2.13.*'
	$(VENV_TF4)/bin/pip install -q -e '.[dev]' 'transformers==4.57.*'
	touch $@

test-tf4: $(VENV_TF4)/.installed
	$(VENV_TF4)/bin/python -m pytest -q $(TF4_TESTS)

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

# Length generalisation and the RULER-style tasks (docs/EVAL.md): curriculum to 4K, eval at
# 512-8K; the needle-only ablation (it trains the base stages every run shares), main, and main's
# long stages again with PoSE positions (main_pose), each starting from its parent's checkpoint.
learn-ruler: $(STAMP_RUN)
	$(BIN)/python benchmarks/learn_ruler.py --out runs/learn-ruler --threads 2

# S2-Attn vs full attention on learn-ruler's 1K-2K stage, both evaluated with full attention.
s2-niah: $(STAMP_RUN)
	$(BIN)/python benchmarks/s2_niah.py --from runs/learn-ruler --out runs/s2-niah --threads 2

LINTED := longdata trainer evals tests benchmarks examples

lint: $(STAMP_DEV)
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

clean:
	rm -rf build runs .longdata_cache $(VENV_TF4)
