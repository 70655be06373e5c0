# hf_levy developer commands. `make help` lists them.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DS_OP := $(VENV)/.deepspeed_op_built

.PHONY: help install test test-fast package-check lint docs recipe clean

# a shipped recipe's name (hf-levy ls) or a recipe YAML file
RECIPE ?= modular_addition

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev,recipes]"
	# torchvision, when a dependency drags a build that does not match torch, breaks `import transformers`.
	$(BIN)/pip uninstall -y torchvision || true
	touch $(STAMP)

# DeepSpeed's CPU communication op, built once here rather than by the first test or launch that needs it
# (two such builds at once, or one killed, used to leave the others waiting on torch's build lock).
$(DS_OP): $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m hf_levy._extension_locks
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
	    get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)"
	touch $(DS_OP)

install: $(STAMP) $(DS_OP)  ## create .venv/ and install hf_levy editable with its dev and recipes extras (torch from the TORCH variable)

# One pytest worker per core, each taking whole test files (a file's module fixtures, such as its torchrun
# launches, then run once); one torch thread per process, since the multi-process tests start two ranks each.
PYTEST_PARALLEL = -n auto --dist loadfile

test: $(STAMP) $(DS_OP)  ## install if needed, then run the test suite (one worker per core)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

test-fast: $(STAMP)  ## the inner loop: every test not marked slow (multi-process, end-to-end, subprocess imports)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

package-check: $(STAMP)  ## build the sdist and wheel, install the wheel alone in a fresh venv, run a shipped recipe from it
	.ci/package_check

recipe: $(STAMP)  ## train the default recipe's arms (stock Trainer vs LevyTrainer) and write the report
	OMP_NUM_THREADS=1 $(BIN)/hf-levy compare --config $(RECIPE)

lint: $(STAMP)  ## run ruff on the package, tests, benchmarks, examples and the docs builder
	$(BIN)/ruff check hf_levy tests benchmarks examples docs
	$(BIN)/ruff format --check hf_levy tests benchmarks examples docs

docs: $(STAMP)  ## build the API reference from the docstrings (pdoc) into site/api/; a pdoc warning fails it
	rm -rf site/api
	OMP_NUM_THREADS=1 $(BIN)/python docs/build_api.py --output site/api

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache build *.egg-info site
