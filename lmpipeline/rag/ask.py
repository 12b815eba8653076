"""`rag-ask`: answer a question with a built RAG system, whichever backend built it.

    rag-ask "Who introduced FlashAttention?" [--rag output/rag] [--top-k N] [--device auto]
    python -m lmpipeline.rag.ask "..."

This is answering only: it imports no training code (no Trainer, FSDP or dvclive).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from lmpipeline.errors import SetupError, StageError
from lmpipeline.rag import cpt_sft, rag_sequence
from lmpipeline.rag.system import System, SystemConfig, check_question

SYSTEMS = {
    cpt_sft.BACKEND: cpt_sft.CptSftSystem,
    rag_sequence.BACKEND: rag_sequence.RagSequenceSystem,
}
PREVIEW_WORDS = 12
MAX_TOP_K = 100


def load_system(path: Path | str = "output/rag", device: str = "auto") -> System:
    """The answering system a rag directory holds; its config.json names the backend."""
    path = Path(path)
    config = SystemConfig.read(path)
    if config.backend not in SYSTEMS:
        known = ", ".join(SYSTEMS)
        raise SetupError(f"{path}/config.json names backend {config.backend!r} (known: {known})")
    return SYSTEMS[config.backend].load(path, config, device)


def retrieval(config: SystemConfig) -> str:
    """How the system retrieves, in words: "hybrid retrieval (dense weight 0.5) reranked"."""
    words = f"{config.retriever} retrieval"
    if config.fusion_weight is not None:
        words += f" (dense weight {config.fusion_weight})"
    return words + (" reranked" if config.reranker else "")


def top_k(text: str) -> int:
    """--top-k: a whole number of passages, at least one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of passages, not {text!r}") from None
    if not 1 <= value <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_TOP_K} passages, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer a question with the trained RAG system")
    parser.add_argument("question")
    parser.add_argument("--rag", type=Path, default=Path("output/rag"), help="rag directory")
    parser.add_argument("--top-k", type=top_k, default=None, help="passages in the prompt")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # loading bars would bury a one-line answer
    try:
        check_question(args.question)
        system = load_system(args.rag, args.device)
    except StageError as err:
        print(err.report("ask"), file=sys.stderr)
        return 1
    start = time.perf_counter()
    answer = system.ask(args.question, args.top_k)
    took = time.perf_counter() - start
    print(answer.text)
    print(f"\n({took:.2f} s; {retrieval(system.config)}, passages used:)")
    for hit in answer.passages:
        words = hit.entry.text.split()
        preview = " ".join(words[:PREVIEW_WORDS]) + (" ..." if len(words) > PREVIEW_WORDS else "")
        print(f"  [{hit.entry.id}] {hit.score:.3f}  {preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
