# `make demo` and `make test` each build .venv when it is missing, then run.
# TORCH_SPEC picks the torch build: the default is the CPU wheel this kind of
# machine keeps on disk; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0" with
# their CUDA index, or TORCH_SPEC="" to keep the torch already in .venv.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.afloc-installed
DEV_STAMP := $(VENV)/.afloc-dev-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint venv clean

# The demo needs only the runtime packages; the test suite adds the dev extras
# (pytest, hypothesis, ruff, and Triton for its CPU interpreter: about 1 GB and
# 13 s of install that a demo user does not need) on top.
venv: $(DEV_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/afloc demo

test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
