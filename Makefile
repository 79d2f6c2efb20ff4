# The two commands of the README. Both build their own virtual environment, so they work on a
# fresh machine. torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: demo test venv bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"

venv: $(BIN)/python
	$(BIN)/pip install -q -e ".[test,hf]"

demo: venv
	$(BIN)/python examples/demo.py

test: venv
	$(BIN)/python -m pytest -n 2 --durations=15

bench: venv
	$(BIN)/python benchmarks/run.py
