"""Fine-tuning the cross-encoder reranker (`lmpipeline.rag.rerank`) of the `cpt-sft` system.

The base encoder (cpt.model) gets a one-logit head and learns, on the fit questions, to score a
question's gold chunk above `rag.rerank.negatives` chunks that the first stage ranks high for it
but that are silent on its answer (`silent_on`: a chunk restating the answer is never a
negative), one softmax per question (`listwise_loss`, as in Gao et al.'s localized contrastive
estimation). The first-stage ranking a question's negatives come from is one that was not trained
on that question (the cross-fitted retrievers of `cpt_sft_train`), so they are the passages it
will meet when answering. The calibration questions are its held-out loss; held-out questions
never reach it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmpipeline.models import ModelSource, load_model, quietly
from lmpipeline.params import Params
from lmpipeline.rag.backend import Training, make_trainer
from lmpipeline.rag.knowledge import Entry, Questions, silent_on
from lmpipeline.rag.rerank import pair_inputs
from lmpipeline.training import LossParts, checkpoint_dir, throughput, train_resumable


@dataclass(frozen=True)
class Group:
    """A question, its gold entry and its mined negatives: one softmax of the loss."""

    question: str
    gold: int
    negatives: tuple[int, ...]


def groups(
    split: Questions, ranked: np.ndarray, entries: Sequence[Entry], n: int, depth: int
) -> list[Group]:
    """For each question of `split` (all in corpus), its first gold and the `n` best-ranked
    entries of its row of `ranked` within `depth` that are neither gold nor hold a quarter of its
    answer. A question with no such entry teaches nothing and is left out."""
    out = []
    for record, golds, row in zip(split.records, split.golds, ranked, strict=True):
        negatives = [
            int(e)
            for e in row[:depth]
            if e >= 0 and e not in golds and silent_on(record["answer"], entries[e].text)
        ][:n]
        if negatives:
            out.append(Group(record["question"], golds[0], tuple(negatives)))
    return out


@dataclass(frozen=True)
class GroupCollator:
    """Tokenizes groups into `listwise_loss`'s inputs: every group's pairs, the gold first, padded
    to the largest group (`valid` marks the real pairs)."""

    tokenizer: PreTrainedTokenizerBase
    entries: Sequence[Entry]
    max_length: int

    def __call__(self, batch: Sequence[Group]) -> dict[str, torch.Tensor]:
        width = 1 + max(len(g.negatives) for g in batch)
        questions, passages, valid = [], [], []
        for g in batch:
            ids = [g.gold, *g.negatives]
            ids += [g.gold] * (width - len(ids))  # padding pairs, masked out of the softmax
            questions += [g.question] * width
            passages += [self.entries[e].text for e in ids]
            valid.append([n <= len(g.negatives) for n in range(width)])
        pairs = pair_inputs(self.tokenizer, questions, passages, self.max_length)
        return {**pairs, "valid": torch.tensor(valid)}


def listwise_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """Cross-entropy of the gold among its group's passages (the gold is each group's first)."""
    valid = inputs["valid"]
    pairs = {k: v for k, v in inputs.items() if k != "valid"}
    logits = model(**pairs).logits.view(valid.shape).float()
    logits = logits.masked_fill(~valid.to(logits.device), float("-inf"))
    targets = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return LossParts(
        loss_sum=F.cross_entropy(logits, targets, reduction="sum"),
        predicted=torch.tensor(len(logits)),
        correct=(logits.argmax(-1) == 0).sum(),
    )


def train_reranker(
    fit: list[Group],
    calibration: list[Group],
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    entries: Sequence[Entry],
    params: Params,
    device: torch.device,
    mode: str | None,
    inputs: Sequence[str],
) -> tuple[PreTrainedModel, dict, list[dict]]:
    """The cross-encoder fine-tuned on the `fit` groups (`calibration`: its eval loss); its
    training speed and loss log. `inputs` are what a resumed run must share (digests)."""
    cfg = params.rag.rerank
    with quietly():  # the one-logit head is new: that is the point
        model = load_model(AutoModelForSequenceClassification, source, num_labels=1).to(device)
    collate = GroupCollator(tokenizer, entries, cfg.max_length)
    training = Training(listwise_loss, collate, fit, calibration)
    config = (asdict(cfg), params.seed, params.device, params.fp16, [asdict(g) for g in fit])
    out = checkpoint_dir("rag.rerank", *config, *inputs)
    trainer = make_trainer(model, training, cfg, params.seed, device, mode, out, params.launch)
    model = train_resumable(trainer, "rag: rerank")
    flops = 6.0 * model.num_parameters(exclude_embeddings=True)
    speed = throughput("rag: rerank", trainer, flops, device)
    return model, speed, trainer.state.log_history
