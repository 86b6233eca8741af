# bdclean - set-up and everyday commands. `make demo` and `make test` work as the first command on a fresh clone.
# The hf extra (transformers) is installed too, so `make test` runs the Hugging Face model tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: an unpinned `torch` would pull the newest CUDA build (several GB).
# On machines with a local CPU wheel (pip find-links) this picks it up; override with TORCH=torch==X.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# The timm tests need timm, and timm needs a torchvision that imports beside torch: PyPI's torchvision
# does not beside the CPU build above, so they get their own environment with a matching pair
# (a CUDA build that also runs on CPU; about 6 GB of disk and 3 minutes to install).
TIMM_VENV  ?= .venv-timm
TIMM_TORCH ?= torch==2.14.1 torchvision==0.29.1
TIMM_STAMP := $(TIMM_VENV)/.installed

.PHONY: install demo test test-all test-timm bench lint clean

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

$(TIMM_STAMP): pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TIMM_VENV)/bin/python -m pip install --quiet $(TIMM_TORCH)
	$(TIMM_VENV)/bin/python -m pip install --quiet -e ".[dev,timm]"
	touch $(TIMM_STAMP)

# The import first: where timm cannot import the test file skips, and pytest would report success.
test-timm: $(TIMM_STAMP)
	$(TIMM_VENV)/bin/python -c "import timm"
	$(TIMM_VENV)/bin/python -m pytest -q tests/test_timm_models.py

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_purify.py

# ruff check: the rules in pyproject.toml [tool.ruff.lint] (syntax errors included); ruff format --check: the
# layout [tool.ruff.format] writes (run `$(BIN)/ruff format $(LINT_PATHS)` to apply it); lint-imports: the import contracts in pyproject.toml
# [tool.importlinter] (no cycles, the layers, only the CLI imports typer). docs/architecture.md explains each.
LINT_PATHS := backdoor_cli tests benchmarks examples experiments
lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(TIMM_VENV) bdclean-demo .pytest_cache build *.egg-info
