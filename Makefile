# The README's two commands: `make demo` and `make test`. Both create the virtual environment if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/imagebeam demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not pipeline"

# Every benchmark, then one table (10-20 min on 2 cores); `make bench BENCH_ARGS="--quick --output bench.md"`.
bench: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_all.py $(BENCH_ARGS)

clean:
	rm -rf demo-output .pytest_cache
