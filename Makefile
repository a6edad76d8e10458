# capsrun: `make train` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
# pytest-xdist workers for `make test` (one per core; each test file runs on one worker): 0 runs in one process
WORKERS ?= auto

.PHONY: help install train test test-fast bench results tensorboard clean

$(BIN)/capsrun: pyproject.toml constraints/local.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints/local.txt -e ".[dev]"
	touch $@

install: $(BIN)/capsrun  ## create .venv and install capsrun with its dev tools

train: install  ## train the paper's CapsNet on MNIST (extra overrides: make train ARGS="trainer.epochs=5")
	$(BIN)/capsrun train model=capsnet $(ARGS)

test: install  ## the whole test suite, as CI runs it (CPU, no network; about 10 minutes on 2 cores)
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile $(ARGS)

test-fast: install  ## the unit tests only, no end-to-end CLI runs (a few minutes)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

bench: install  ## throughput table, every model and speed setting (quick: make bench ARGS="models=[capsnet] batch_sizes=[128]")
	$(BIN)/capsrun bench $(ARGS)

results: install  ## render the README's and docs/performance.md's tables from results/*.csv
	$(BIN)/python -m capsrun.results README.md docs/performance.md

tensorboard: install  ## browse every run under outputs/
	$(BIN)/tensorboard --logdir outputs

clean:  ## remove .venv and pytest's cache (runs in outputs/ and data/ stay)
	rm -rf $(VENV) .pytest_cache

help:  ## list these targets with what each does
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
