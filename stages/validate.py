"""Stages `validate_pretrain`, `validate_sft` and `validate_rag`: check one data file with its Great
Expectations suite and, only if it passes, write it in canonical form (split into train and eval
for prompt/response data).

    python -m stages.validate sft --input data/sft.jsonl --output output/data/sft \
        --metrics metrics/validate/sft.json --report metrics/validate/sft.md

The suites and the split are in `lmpipeline.validation`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmpipeline import stage
from lmpipeline.data import write_text_atomic
from lmpipeline.params import Params
from lmpipeline.validation import DATASETS, render_report, validate_file, write_outputs


@dataclass(frozen=True)
class ValidatePaths:
    dataset: str = field(metadata={"choices": sorted(DATASETS)})
    """The kind of data: pretrain (text), sft or rag (JSONL)."""
    input: Path
    """The user's data file."""
    output: Path
    """The canonical file (pretrain), or the directory of train.jsonl and eval.jsonl."""
    metrics: Path
    """Counts, as JSON (a DVC metric)."""
    report: Path
    """Every expectation and its result, as Markdown."""

    @property
    def stage(self) -> str:
        return f"validate_{self.dataset}"


def run(params: Params, paths: ValidatePaths) -> None:
    ds = DATASETS[paths.dataset]
    frame, metrics, result = validate_file(paths.input, ds, params)
    write_outputs(frame, ds, paths.output)
    write_text_atomic(paths.metrics, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_text_atomic(paths.report, render_report(paths.input.as_posix(), ds, result, metrics))
    split = f", {metrics['train']} train / {metrics['eval']} eval" if ds.split_key else ""
    print(f"validate {ds.name}: {paths.input} OK, {metrics['records']} records{split}")


def main(argv: list[str] | None = None) -> int:
    return stage.main(ValidatePaths, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
