# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
# Torch goes in first and pinned: an unpinned torch (direct or via a dependency) pulls CUDA builds.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/colora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,demo,quant,ray,privacy,deploy]"
	touch $@

setup: $(BIN)/colora

demo: setup
	$(BIN)/colora compare examples/quickstart.yaml --out runs/quickstart --target eval/accuracy=0.8 --jobs 2

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf runs reports .pytest_cache
