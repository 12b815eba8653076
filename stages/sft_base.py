"""Stage `sft_base`: turn `sft.model` into a plain Hugging Face directory, once.

The bundled SmolLM2 ships as a Q4_1 GGUF file; dequantizing it takes tens of seconds, so this
cached stage does it once per base model and writes safetensors that the SFT stage (and any user)
loads directly. Other references (a local directory, a hub id) are copied the same way, so
SFT always starts from `output/sft_base`.

    python -m stages.sft_base --output output/sft_base
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from stages.models import ModelNotFoundError, load_model, load_tokenizer, resolve_model
from stages.params import load_stage_params


def export_base(ref: str, output: Path) -> int:
    """Write model and tokenizer of `ref` to `output` as safetensors; return the parameter count."""
    source = resolve_model(ref)
    tokenizer = load_tokenizer(source)
    model = load_model(AutoModelForCausalLM, source)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return model.num_parameters()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)

    ref = load_stage_params(args.params, "sft_base").sft.model
    start = time.perf_counter()
    try:
        n_params = export_base(ref, args.output)
    except ModelNotFoundError as err:
        print(f"sft_base: {err}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    print(f"sft_base: {ref} -> {args.output} ({n_params / 1e6:.1f}M parameters, {took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
