"""Stages `validate_pretrain`, `validate_sft` and `validate_rag`: check one data file with its Great
Expectations suite and, only if it passes, write it in canonical form (split into train and eval
for prompt/response data). Each validated RAG question also gets its gold entries: the chunks of
the validated passages that state its answer (`lmpipeline.rag.knowledge` has the rule).

    python -m stages.validate sft --input data/sft.jsonl --output output/data/sft \
        --metrics metrics/validate/sft.json --report metrics/validate/sft.md
    python -m stages.validate rag --input data/rag.jsonl --output output/data/rag \
        --passages output/data/pretrain.txt --metrics metrics/validate/rag.json \
        --report metrics/validate/rag.md

The input may be a .jsonl, .txt (pretrain), .parquet or .csv file, or a folder saved by
`Dataset.save_to_disk` (`lmpipeline.sources` reads each); dvc.yaml passes params' `data.<dataset>`,
and the stage reads the column mapping, `data.columns.<dataset>`, from the params itself.
The suites and the split are in `lmpipeline.validation`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmpipeline import stage
from lmpipeline.data import read_passages, write_text_atomic
from lmpipeline.errors import StageError
from lmpipeline.params import Params
from lmpipeline.rag.knowledge import GoldRule, passage_chunks
from lmpipeline.stage import INPUT
from lmpipeline.validation import DATASETS, render_report, validate_file


@dataclass(frozen=True)
class ValidatePaths:
    dataset: str = field(metadata={"choices": sorted(DATASETS)})
    """The kind of data: pretrain (passages), sft or rag (records)."""
    input: Path = field(metadata=INPUT)
    """The user's data: a .jsonl, .txt (pretrain), .parquet or .csv file, or a saved dataset."""
    output: Path
    """The canonical file (pretrain), or the directory of train.jsonl and eval.jsonl."""
    metrics: Path
    """Counts, as JSON (a DVC metric)."""
    report: Path
    """Every expectation and its result, as Markdown."""
    passages: Path | None = None  # checked by add_golds, which says which stage makes it
    """rag: the validated passages (output of validate_pretrain), whose chunks state answers."""

    @property
    def stage(self) -> str:
        return f"validate_{self.dataset}"


def gold_rule(passages: Path | None, params: Params) -> GoldRule:
    """The rule that gives each question its gold chunk ids, over the validated passages."""
    if passages is None or not passages.is_file():
        raise StageError(
            f"--passages {passages}: the validated passages are needed to find the chunks that"
            " state each answer: run `dvc repro validate_pretrain` first"
        )
    cfg, texts = params.rag, read_passages(passages)
    return GoldRule(passage_chunks(texts, cfg.chunk_words, cfg.chunk_overlap), texts)


def run(params: Params, paths: ValidatePaths) -> None:
    ds = DATASETS[paths.dataset]
    golds = (lambda: gold_rule(paths.passages, params)) if ds.name == "rag" else None
    metrics, checked = validate_file(paths.input, ds, params, paths.output, golds)
    write_text_atomic(paths.metrics, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_text_atomic(paths.report, render_report(paths.input.as_posix(), ds, checked, metrics))
    split = f", {metrics['train']} train / {metrics['eval']} eval" if ds.split_key else ""
    print(f"validate {ds.name}: {paths.input} OK, {metrics['records']} records{split}")


def main(argv: list[str] | None = None) -> int:
    return stage.main(ValidatePaths, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
