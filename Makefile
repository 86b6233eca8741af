# bdclean - set-up and everyday commands. `make demo` and `make test` work as the first command on a fresh clone.
# The hf extra (transformers) is installed too, so `make test` runs the Hugging Face model tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: an unpinned `torch` would pull the newest CUDA build (several GB).
# On machines with a local CPU wheel (pip find-links) this picks it up; override with TORCH=torch==X.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,hf,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bdclean demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_purify.py

lint: $(STAMP)
	$(BIN)/python -m compileall -q backdoor_cli tests benchmarks examples

clean:
	rm -rf $(VENV) bdclean-demo .pytest_cache build *.egg-info
