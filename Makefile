# The two commands of the README. Both build their own virtual environment, so they work on a
# fresh machine. torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: demo test venv bench chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"

venv: $(BIN)/python
	$(BIN)/pip install -q -e ".[test,hf]"

demo: venv
	$(BIN)/python examples/demo.py

# The dashboard's browser tests drive Debian's chromium (never `playwright install`). Installed
# here when missing and we are root with apt-get; otherwise those tests skip and say why.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "note: apt-get could not install chromium; the browser tests will skip"; \
	else echo "note: /usr/bin/chromium is missing (not root with apt-get); the browser tests will skip"; fi

test: venv chromium
	$(BIN)/python -m pytest -n 2 --durations=15

bench: venv
	$(BIN)/python benchmarks/run.py
