"""How the `rag` stage builds a system, whichever backend: the `Backend` interface, and the one flow
that drives it (`build`): rank before fine-tuning, fine-tune with the shared Trainer, rank again,
save, load the system as `ask` will, and score it into `metrics/rag.json`.

A backend decides what is trained and how it ranks the entries; the knowledge base, the Trainer
setup, checkpoints, BM25 and hybrid rankings, timings and metrics are the same for every backend.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import bm25s
import numpy as np
import torch
from transformers import PreTrainedModel

from lmpipeline.data import file_digest
from lmpipeline.metrics import gold_ranks
from lmpipeline.params import LaunchParams, Params, TrainingParams
from lmpipeline.rag.evaluation import print_retrieval, score_system
from lmpipeline.rag.knowledge import KnowledgeBase, Questions
from lmpipeline.rag.system import System
from lmpipeline.runtime import end_distributed, is_main_process
from lmpipeline.stage import StageResult
from lmpipeline.training import (
    EpochSampler,
    LossFn,
    StageTrainer,
    checkpoint_dir,
    score,
    throughput,
    train_resumable,
    training_args,
)

Record = dict[str, Any]


@dataclass(frozen=True)
class Training:
    """What fine-tuning a backend's model needs besides the model: its loss, and how to batch
    the train and held-out items (whatever one item is for the backend)."""

    loss_fn: LossFn
    collator: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    train: list[Any]
    held_out: list[Any]


@dataclass(frozen=True)
class Outputs:
    """Where a build goes: the system, the curves and the per-question predictions."""

    system: Path
    plots: Path
    predictions: Path


class Backend(Protocol):
    """One way to build a RAG system over a knowledge base."""

    embed_per_s: float  # entries the backend's index embedded per second
    timings: dict[str, Any]  # speed of any training besides the fine-tuning, by name

    def load_model(self) -> PreTrainedModel:
        """The model that fine-tuning trains, ready to rank the entries."""
        ...

    def base_ranks(self, model: PreTrainedModel, questions: Sequence[str]) -> dict[str, np.ndarray]:
        """Full rankings of the entries for `questions` before fine-tuning, by retriever name."""
        ...

    def training(self, train: Questions, held_out: Questions) -> Training:
        """The loss and batches of fine-tuning on the train questions (held-out: eval loss)."""
        ...

    def checkpoint_inputs(self) -> list[Path]:
        """Files besides the data whose content a resumed run must share (input models)."""
        ...

    def decisions(self) -> dict[str, Any]:
        """What the backend chose from the train questions, for metrics/rag.json."""
        ...

    def rank(self, model: PreTrainedModel, questions: Sequence[str]) -> np.ndarray:
        """Full rankings of the entries for `questions` by the fine-tuned model."""
        ...

    def save(self, model: PreTrainedModel, output: Path, bm25: bm25s.BM25) -> int:
        """Write the system `load` reads to `output`; return the index's dimension."""
        ...

    def final_ranks(self, questions: Sequence[str], dense: np.ndarray) -> dict[str, np.ndarray]:
        """Rankings of the entries for `questions` besides the fine-tuned model's (`dense`), by
        metric name: "bm25", "hybrid", ... and "system", what the saved system retrieves."""
        ...

    def flops_per_token(self, model: PreTrainedModel) -> float | None:
        """Training FLOPs per counted token, for MFU; None where it is not a constant."""
        ...

    def discard(self) -> None:
        """Remove what a rank other than 0 wrote for itself while training."""
        ...

    def load(self, output: Path, device: str) -> System:
        """The saved system, as `ask` loads it."""
        ...


@contextlib.contextmanager
def phase(timings: dict[str, Any], name: str) -> Iterator[None]:
    """Seconds the block took, as `timings["phases_s"][name]` (where a stage's time goes)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings.setdefault("phases_s", {})[name] = round(time.perf_counter() - start, 1)


def make_trainer(
    model: PreTrainedModel,
    training: Training,
    cfg: TrainingParams,
    seed: int,
    device: torch.device,
    mode: str | None,
    checkpoints: Path,
    launch: LaunchParams = LaunchParams(),
) -> StageTrainer:
    """The Trainer of the stage's fine-tunings (every backend's; cpt-sft's folds and reranker):
    the loss over shuffled train items, the loss over `training.held_out` as eval."""
    batches = [
        training.collator(training.held_out[i : i + cfg.batch_size])
        for i in range(0, len(training.held_out), cfg.batch_size)
    ]
    return StageTrainer(
        model=model,
        args=training_args(cfg, seed, device, mode, checkpoints, len(training.train), launch),
        train_dataset=training.train,
        eval_dataset=batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        data_collator=training.collator,
        loss_fn=training.loss_fn,
        # No held-out items, no held-out loss (rather than a loss of 0 over nothing).
        eval_fn=lambda m: {"eval_loss": score(training.loss_fn, m, batches)[0]} if batches else {},
        sampler=EpochSampler(len(training.train), seed),
    )


def build(
    backend: Backend,
    kb: KnowledgeBase,
    train: Questions,
    held_out: Questions,
    params: Params,
    inputs: Sequence[Path],
    outputs: Outputs,
    device: torch.device,
    mode: str | None,
) -> StageResult | None:
    """Fine-tune, rank, save and score a system; return metrics and timings (None on the ranks
    other than 0 of a distributed run, which only fine-tune). `inputs` are the data files a
    resumed run must share. Retrieval is scored on the held-out questions whose answer a chunk
    states; answers on every held-out question."""
    cfg = params.rag
    scored = held_out.in_corpus()
    questions, gold = scored.questions, scored.golds
    timings = backend.timings
    with phase(timings, "start"):
        model = backend.load_model()
    ranks: dict[str, list[np.ndarray]] = {}
    if is_main_process():  # the other ranks of a distributed run only fine-tune
        base = backend.base_ranks(model, questions)
        ranks.update({name: gold_ranks(ranked, gold) for name, ranked in base.items()})

    trainer = None
    if cfg.train.enabled:
        config = (asdict(cfg), params.seed, params.device, params.fp16, params.launch.strategy)
        digests = map(file_digest, [*inputs, *backend.checkpoint_inputs()])
        checkpoints = checkpoint_dir("rag", *config, *digests)
        training = backend.training(train, held_out)
        trainer = make_trainer(
            model, training, cfg.train, params.seed, device, mode, checkpoints, params.launch
        )
        with phase(timings, "fine-tune"):
            model = train_resumable(trainer, "rag")
    else:
        end_distributed()  # as train_resumable would: what follows runs on rank 0 alone
        print("rag: fine-tuning off (rag.train.enabled: false): the start is used as it is")
    if not is_main_process():
        backend.discard()
        return None

    dense = backend.rank(model, questions)
    ranks["finetuned"] = gold_ranks(dense, gold)
    dim = backend.save(model, outputs.system, kb.bm25)  # cpt-sft: its phases are timed inside
    final = backend.final_ranks(questions, dense)
    ranks.update({name: gold_ranks(ranked, gold) for name, ranked in final.items()})
    print_retrieval(ranks)

    speed = {}
    if trainer is not None:
        speed["train"] = throughput("rag", trainer, backend.flops_per_token(model), device)
    history = trainer.state.log_history if trainer is not None else []
    del model, trainer  # with its optimizer state: rag-sequence-nq's would double peak memory
    gc.collect()
    with phase(timings, "score"):
        system = backend.load(outputs.system, params.device)  # what `ask` will load
        metrics, latency = score_system(
            system, kb, held_out, cfg, ranks, history, dim, outputs.plots, outputs.predictions
        )
    metrics.update(backend.decisions())
    latency = {"embed_passages_per_s": round(backend.embed_per_s, 1), **latency}
    return StageResult(metrics, {**speed, **backend.timings, "latency": latency})
