#!/usr/bin/env bash
# The pipeline's smoke profile (lmpipeline/smoke.py: every stage, a few steps each) on a CUDA GPU,
# then each training stage's tokens/s and MFU from its timings file. A few minutes on one GPU.
#
#   bash benchmarks/gpu_smoke.sh [WORK_DIR]
#
# Needs a CUDA build of torch in the environment: `make setup` installs the CPU build.
# fp16: auto picks bf16 on GPUs that support it, fp16 on the others.
set -euo pipefail

python - <<'PY'
import torch

if not torch.cuda.is_available():
    raise SystemExit("gpu_smoke: torch sees no CUDA device (is this a CPU build of torch?)")
name = torch.cuda.get_device_name(0)
precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
print(f"gpu_smoke: {name}, torch {torch.__version__}, fp16: auto -> {precision}")
PY

work="${1:-$(mktemp -d -t pipeline-gpu-smoke-XXXX)}"
python -m lmpipeline.smoke -S device=cuda --dir "$work" --keep

python - "$work" <<'PY'
import json
import sys
from pathlib import Path

timings = Path(sys.argv[1]) / "output" / "timings"
for stage in ("cpt", "sft", "rag"):
    record = json.loads((timings / f"{stage}.json").read_text(encoding="utf-8"))
    train = record.get("train", {})
    figures = {k: train[k] for k in ("steps", "tokens", "tokens_per_s", "mfu") if k in train}
    print(f"gpu_smoke: {stage:<4} stage {record['stage_s']} s  {figures}")
PY
