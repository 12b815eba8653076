# The two commands of the README: `make repro` and `make test`. Both create .venv when needed.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# DVC stage commands call `python`; run them with the project's environment.
export PATH := $(BIN):$(PATH)

.PHONY: setup repro smoke test test-fast lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

repro: setup
	dvc repro
	@python -m stages.summary

# The whole pipeline with tiny step counts in a throw-away copy: checks an install in minutes.
smoke: setup
	python -m stages.smoke

test: setup
	pytest

test-fast: setup
	pytest -m "not slow"

lint: setup
	ruff check .
	ruff format --check .
