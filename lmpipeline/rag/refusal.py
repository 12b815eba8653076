"""Refusal as a decision of the `cpt-sft` reader: "The passages do not say." where the reader's own
likelihood of that refusal passes a threshold calibrated on train questions, else its best answer.

A reader taught to refuse (`lmpipeline.rag.reader`) puts its probability that the passages lack
the answer on the refusal: every other output is some answer. So the decision reads the refusal's
log-likelihood given the prompt (`prefill`: the forward pass over the prompt that generation needs
anyway, with the refusal's few tokens after it), not a greedy decoding
that would refuse wherever the refusal's first tokens happen to lead: the threshold, chosen where
it maximizes answer F1 on the calibration questions (`choose_threshold`), sets how sure it must
be. Compared with the likelihood of the best answer instead, the refusal's alone does not count
the spread of an answer over its phrasings as doubt, and it is known before the first token of
the answer, so a streamed answer never has to be taken back. Where the reader answers, its
refusal is blocked (`NoRefusal`), so that the answer is the best one that is not the refusal.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    BatchEncoding,
    Cache,
    LogitsProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmpipeline.chat import encode
from lmpipeline.metrics import token_f1


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """The tokens of `response` as the reader was taught to answer with it (the chat template's
    end of turn included)."""
    example = encode(tokenizer, "?", response, max_length=2**31)
    assert example is not None  # no length bound: the response is always there
    return [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]


@dataclass
class Prefilled:
    """A left-padded batch of prompts read once: the log-likelihood of the refusal after each,
    and the keys and values of all but each prompt's last token, for generating from there."""

    logprobs: torch.Tensor  # (batch,)
    cache: Cache


@torch.no_grad()
def prefill(model: PreTrainedModel, batch: BatchEncoding, refusal: Sequence[int]) -> Prefilled:
    """One forward pass over each prompt followed by the refusal: the refusal's log-likelihood
    (the sum over its tokens), and the prompts' cache with the refusal and the last prompt token
    cut off, so that generation goes on from the prompt itself (its first step recomputes the
    last token, as generation from a cache does)."""
    model.eval()
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    tail = torch.tensor(refusal, device=model.device).expand(len(ids), -1)
    full, full_mask = torch.cat([ids, tail], 1), torch.cat([mask, torch.ones_like(tail)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
    out = model(
        input_ids=full,
        attention_mask=full_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=len(refusal) + 1,  # the vocabulary projection of the refusal's only
    )
    logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, tail.unsqueeze(-1)).squeeze(-1).sum(-1)
    cache = out.cache
    cache.crop(-(len(refusal) + 1))
    return Prefilled(picked.cpu(), cache)


class NoRefusal(LogitsProcessor):
    """Blocks the refusal as an answer: the token that would complete its opening (its first two
    tokens, "The passages") right at the start of the answer. Answers that merely begin as it
    does ("The ...") stay possible."""

    def __init__(self, opening: Sequence[int], prompt_width: int) -> None:
        self.opening = list(opening)
        self.prompt_width = prompt_width  # the (padded) prompt's length: answers start there

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        if step != len(self.opening) - 1:
            return scores
        prefix = torch.tensor(self.opening[:step], device=input_ids.device)
        started = (input_ids[:, self.prompt_width :] == prefix).all(dim=1)
        scores[started, self.opening[-1]] = float("-inf")
        return scores


def choose_threshold(
    logprobs: Sequence[float], answer_f1: Sequence[float], lacking: Sequence[bool]
) -> float | None:
    """The refusal threshold that maximizes answer F1 over calibration questions when a refusal
    scores 1 where the passages lack the answer and 0 where they hold it (SQuAD 2.0's rule for
    questions without an answer), and an answer scores its F1: refuse where the log-likelihood
    of the refusal is above it. Thresholds lie halfway between the questions' log-likelihoods
    (and below the lowest); among equal scores the one that refuses least wins. None: never
    refusing scores best."""
    lp, f1, lack = np.asarray(logprobs, float), np.asarray(answer_f1, float), np.asarray(lacking)
    values = np.unique(lp)[::-1]  # highest first: each threshold refuses more than the last
    below = [float(values[-1]) - 1.0] if len(values) else []
    halfway = [float(a + b) / 2 for a, b in itertools.pairwise(values)]
    best, best_score = None, float(f1.mean()) if len(f1) else 0.0
    for threshold in [*halfway, *below]:
        scored = float(np.where(lp > threshold, lack, f1).mean())
        if scored > best_score:  # strictly: a tie keeps the threshold that refuses less
            best, best_score = threshold, scored
    return best


def f1_with_refusals(
    answers: Sequence[str],
    references: Sequence[str],
    refused: Sequence[bool],
    lacking: Sequence[bool],
) -> float:
    """Mean answer F1, a refusal scoring 1 where the passages lack the answer, 0 where not."""
    scores = [
        float(lack) if no else token_f1(a, r)
        for a, r, no, lack in zip(answers, references, refused, lacking, strict=True)
    ]
    return sum(scores) / max(len(scores), 1)
