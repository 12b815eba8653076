#!/usr/bin/env bash
# The training stages on a bare GPU machine, a few steps each, with assertions (benchmarks/gpu_check.py
# says what is checked and printed).
#
#   bash benchmarks/gpu_check.sh pack        here: writes .gpucheck/ (wheels, model configs, data)
#   bash benchmarks/gpu_check.sh run [--trl] on the GPU machine, .gpucheck/ carried along (--trl: then
#                                            SFT against TRL's SFTTrainer, benchmarks/sft_vs_trl.py)
#   bash benchmarks/gpu_check.sh --dry-run   here: pack, then the same commands on the CPU
#
# The GPU machine needs torch (a CUDA build), accelerate, peft, pyarrow and pandas (transformers
# travels: the image's is older than the floor);
# the rest travels in .gpucheck/wheels (cp312). Nothing is downloaded there.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

case "${1:-}" in
    --dry-run) exec "$python" -m benchmarks.gpu_check dry-run ;;
    pack) exec "$python" -m benchmarks.gpu_check pack ;;
    run)
        site="$(mktemp -d -t gpu-check-site-XXXX)"
        "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
            .gpucheck/wheels/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        exec "$python" -m benchmarks.gpu_check run "${@:2}"
        ;;
    *)
        echo "usage: bash benchmarks/gpu_check.sh pack | run [--device cuda:N] | --dry-run" >&2
        exit 2
        ;;
esac
