# The two commands of the README. Both build their own virtual environment, so they work on a
# fresh machine. torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

SWIFT_VENV ?= .venv-swift
SWIFT_BIN = $(SWIFT_VENV)/bin
# ms-swift pins its own transformers/peft range, so its tests get an environment of their own.
SWIFT ?= ms-swift==4.6.0

.PHONY: demo test test-main test-swift venv bench chromium

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

# The main suite and the ms-swift suite (whose environment installs meanwhile) run side by side.
test: venv chromium
	$(MAKE) -j2 --output-sync=target test-main test-swift

test-main:
	$(BIN)/python -m pytest -n 2 --durations=15

$(SWIFT_BIN)/python:
	$(PYTHON) -m venv $(SWIFT_VENV)
	$(SWIFT_BIN)/pip install -q "$(TORCH)"
	$(SWIFT_BIN)/pip install -q -e ".[test,hf]" "$(SWIFT)"

test-swift: $(SWIFT_BIN)/python
	$(SWIFT_BIN)/python -m pytest -q -p no:cacheprovider tests/test_swift.py

bench: venv
	$(BIN)/python benchmarks/run.py
