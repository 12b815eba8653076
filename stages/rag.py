"""Stage `rag`: a retriever over a FAISS index of the knowledge base, answers grounded in what it
finds, and both scored on the held-out questions.

    python -m stages.rag --cpt output/cpt --sft output/sft --data output/data/rag \
        --pretrain output/data/pretrain.txt --output output/rag --metrics metrics/rag.json \
        --plots metrics/rag --predictions metrics/rag_predictions.jsonl

`rag.backend` chooses how the system is built: `cpt-sft` (the CPT encoder, fine-tuned, retrieves;
the SFT model answers: `lmpipeline.rag.cpt_sft_train`) or `rag-sequence` (transformers'
RagSequenceForGeneration: `lmpipeline.rag.rag_sequence_train`). The flow they share is
`lmpipeline.rag.backend.build`. `output/rag` is then all that `rag-ask "question"` needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from transformers import set_seed

from lmpipeline import launch
from lmpipeline.data import read_jsonl, read_passages
from lmpipeline.errors import StageError
from lmpipeline.params import Params
from lmpipeline.rag.backend import Backend, Outputs, build
from lmpipeline.rag.cpt_sft_train import CptSftBackend
from lmpipeline.rag.knowledge import KnowledgeBase, Questions, knowledge_base
from lmpipeline.rag.rag_sequence_train import RagSequenceBackend
from lmpipeline.runtime import precision, resolve_device
from lmpipeline.stage import INPUT, StageResult, TrainingPaths


@dataclass(frozen=True, kw_only=True)
class RagPaths(TrainingPaths):
    stage: ClassVar[str] = "rag"
    cpt: Path = field(metadata=INPUT)
    """The CPT encoder directory (cpt-sft: the retriever's start)."""
    sft: Path = field(metadata=INPUT)
    """The SFT model directory (cpt-sft: the generator)."""
    data: Path = field(metadata=INPUT)
    """The directory with the validated train.jsonl and eval.jsonl questions."""
    pretrain: Path = field(metadata=INPUT)
    """The validated passages, one per line."""
    output: Path
    """Where the system goes (what `rag-ask` loads)."""
    predictions: Path
    """Where every held-out question's answers and passages go (JSONL)."""


def backend_for(
    params: Params,
    paths: RagPaths,
    kb: KnowledgeBase,
    train: Questions,
    device: torch.device,
    mode: str | None,
) -> Backend:
    if params.rag.backend == "rag-sequence":
        return RagSequenceBackend(params.rag, kb, paths.output, device)
    return CptSftBackend(params, paths.cpt, paths.sft, kb, train, device, mode)


def run(params: Params, paths: RagPaths) -> StageResult | None:
    """Build and score the RAG system; save it to paths.output; return metrics and timings."""
    set_seed(params.seed)
    device = resolve_device(params.device)
    mode = precision(params.fp16, device)
    train = read_jsonl(paths.data / "train.jsonl")
    held_out = read_jsonl(paths.data / "eval.jsonl")
    if not train or not held_out:
        raise StageError(
            f"{paths.data}: {len(train)} train and {len(held_out)} held-out questions; both are"
            " needed (fine-tuning, and every score): add questions to data/rag.jsonl"
        )
    cfg = params.rag
    kb = knowledge_base(
        read_passages(paths.pretrain), train, cfg.chunk_words, cfg.chunk_overlap, cfg.faq
    )
    train_q = kb.questions(train, paths.data / "train.jsonl")
    held_q = kb.questions(held_out, paths.data / "eval.jsonl")
    stated = len(held_q.in_corpus().records)
    if not stated or (cfg.backend == "cpt-sft" and not train_q.in_corpus().records):
        raise StageError(
            f"{paths.data}: no chunk of {paths.pretrain} states the answer of any"
            f" {'held-out' if not stated else 'train'} question, so retrieval has nothing to"
            " find: the passages must hold what the answers say"
        )
    faq = len(train) if cfg.faq else 0
    print(
        f"rag: {len(kb.entries)} entries ({len(kb.entries) - faq} passage chunks, {faq} FAQ);"
        f" {len(train)} train / {len(held_out)} held-out questions, {len(held_out) - stated}"
        f" of them not in corpus; {device} ({mode or 'fp32'})"
    )
    backend = backend_for(params, paths, kb, train_q, device, mode)
    inputs = [paths.data / "train.jsonl", paths.pretrain]  # what a resumed run must share
    outputs = Outputs(paths.output, paths.plots, paths.predictions)
    return build(backend, kb, train_q, held_q, params, inputs, outputs, device, mode)


def main(argv: list[str] | None = None) -> int:
    return launch.main(RagPaths, run, argv, __doc__, "stages.rag")


if __name__ == "__main__":
    launch.exit_process(main())
