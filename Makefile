# The two commands of the README: `make repro` and `make test`. Both create .venv when needed.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# DVC stage commands call `python`; run them with the project's environment.
export PATH := $(BIN):$(PATH)

.PHONY: setup repro smoke test test-slow test-lowest lint docs serve

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

repro: setup
	dvc repro
	@python -m stages.report

# The whole pipeline with tiny step counts in a throw-away copy: checks an install in minutes.
smoke: setup
	python -m lmpipeline.smoke

# The trained system over HTTP: the playground at http://127.0.0.1:$(PORT)/, the API under /v1.
PORT ?= 8000
serve: setup
	python -m lmpipeline.serve --port $(PORT)

# Everything but the checks marked slow (under 10 minutes on 2 cores); CI runs both targets.
# One pytest-xdist worker per core, a test file per worker (its module fixtures built once); each
# worker computes on one thread (tests/conftest.py).
PYTEST := pytest -n logical --dist loadfile
test: setup
	$(PYTEST) -m "not slow"

test-slow: setup
	$(PYTEST) -m slow

# The fast tests with each direct dependency at the lowest version pyproject.toml allows
# (scripts/lowest.sh). Deprecation warnings stay warnings here: old releases warn about what
# newer ones changed, which is not a broken floor.
LOWEST ?= .venv-lowest
test-lowest:
	bash scripts/lowest.sh $(LOWEST)
	PATH="$(abspath $(LOWEST))/bin:$$PATH" $(PYTEST) -m "not slow" \
		-W default::DeprecationWarning -W default::FutureWarning

lint: setup
	ruff check .
	ruff format --check .

# docs/params.md from the params dataclasses (their defaults and docstrings) and dvc.yaml.
docs: setup
	python -m lmpipeline.docs
