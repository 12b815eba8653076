"""Stage `sft_base`: turn `sft.model` into a plain Hugging Face directory, once.

    python -m stages.sft_base --output output/sft_base

The bundled SmolLM2 ships as a Q4_1 GGUF file; dequantizing it takes tens of seconds, so this
cached stage does it once per base model and writes safetensors that the SFT stage (and any user)
loads directly. Other references (a local directory, a hub id) are copied the same way, so SFT
always starts from `output/sft_base`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lmpipeline import stage
from lmpipeline.models import export_base
from lmpipeline.params import Params


@dataclass(frozen=True)
class SftBasePaths:
    stage: ClassVar[str] = "sft_base"
    output: Path
    """Where the base model goes (a Hugging Face directory)."""


def run(params: Params, paths: SftBasePaths) -> None:
    start = time.perf_counter()
    n_params = export_base(params.sft.model, paths.output)
    took = time.perf_counter() - start
    print(
        f"sft_base: {params.sft.model} -> {paths.output}"
        f" ({n_params / 1e6:.1f}M parameters, {took:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    return stage.main(SftBasePaths, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
