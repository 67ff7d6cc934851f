# Two commands: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
SHARED ?= ../shared

.PHONY: demo test lint venv bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU torch first, so nothing later pulls a CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# A rerun replaces the last demo only once the new one has finished (--overwrite writes it beside).
demo: venv
	$(BIN)/distillery demo --overwrite

lint: venv
	$(BIN)/ruff check distillery tests bench

test: venv lint
	@test -d $(SHARED)/data || echo "note: $(SHARED)/data is missing; tests that need real data will skip"
	$(BIN)/python -m pytest -q --durations=15 tests

bench: venv
	$(BIN)/python bench/bench_decode.py
	$(BIN)/python bench/bench_decode.py --compile

clean:
	rm -rf $(VENV) runs build *.egg-info
