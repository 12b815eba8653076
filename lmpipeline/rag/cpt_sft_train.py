"""Building the `cpt-sft` RAG system: a sentence encoder, mean-pooled and L2-normalized,
fine-tuned DPR-style and indexed with FAISS; the retriever answers use, chosen among dense, BM25
and hybrids; a cross-encoder reranker where it pays; the SFT model taught to read and to refuse.

The train questions are split once (`rag.calibration_fraction`, `seed`): every model trains on
the *fit* questions, and the choices that need a trained reader or reranker are made on the
*calibration* questions, which no model trains on: a choice made there is what a new question
would meet. The first stage is chosen on both, each ranked by a retriever that never saw it.
Held-out questions decide nothing and train nothing; they are only scored
(`lmpipeline.rag.evaluation`).

- **Start.** Fine-tuning starts from the CPT encoder where, fine-tuned on one half of the fit
  questions, it ranks the other half's gold chunks better (MRR) than the base encoder
  (`cpt.model`) fine-tuned the same way (`rag.start_encoder: auto`); else from the base:
  masked-LM training can move the geometry a sentence encoder was trained for, and a retriever
  must never start worse than the encoder CPT began from. What matters is the retriever after
  fine-tuning, so that is where the two are compared. Only train questions decide. With
  fine-tuning off (`rag.train.enabled: false`) the encoders are used, and so compared, as they
  are: on every train question whose answer a chunk states.
- **Negatives.** Each question's first gold chunk is its positive; the other positives of the
  batch are its negatives, and `rag.train.hard_negatives` chunks per question mined from BM25's
  and the starting encoder's top `MINE_DEPTH` that do not state its answer (support below half
  the gold rule's threshold: a margin against false negatives).
- **Cross-fitting.** The fit questions are cut in two halves; a retriever trained (the same
  recipe) on one half ranks the other. So each fit question has a ranking by a retriever that
  never saw it, as a new question is ranked: the first stage is chosen on these, and the
  passages the reader is taught with and the reranker's negatives come from there.
- **Retriever** (`rag.retriever: auto`): the fine-tuned dense ranking, BM25 or their fusion with
  the dense share 0.5, 0.7 or 0.3, whichever ranks the golds of every train question best
  (nDCG@10; a tie goes to the first of that list: `decisions.FIRST_STAGES`): the fit questions
  as cross-fitted, the calibration ones as the fine-tuned retriever ranks them.
- **Reranker** (`lmpipeline.rag.rerank_train`): trained on the fit questions, used where it
  raises the calibration questions' nDCG@10 over the first stage's (`rag.rerank.enabled: auto`).
- **Reader and refusal** (`lmpipeline.rag.reader`, `lmpipeline.rag.refusal`): the SFT model
  taught on the fit questions with their cross-fitted passages, then the refusal threshold that
  maximizes answer F1 on the calibration questions, as the saved system answers them.

Retrieval is ranked for the base encoder and the CPT encoder as is before fine-tuning, and for
the fine-tuned one after. The system it saves is `lmpipeline.rag.cpt_sft`.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import bm25s
import faiss
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lmpipeline.chat import load_chat_tokenizer
from lmpipeline.data import file_digest
from lmpipeline.metrics import gold_ranks, retrieval_scores
from lmpipeline.models import load_model, load_tokenizer, quietly, resolve_model, save_pretrained
from lmpipeline.params import Params
from lmpipeline.rag.backend import Training, make_trainer, phase
from lmpipeline.rag.cpt_sft import (
    BACKEND,
    BM25_DIR,
    CLOSED_BOOK_PROMPT,
    PASSAGE,
    RAG_PROMPT,
    RETRIEVER_DIR,
    CptSftSystem,
    fitted_prompt,
)
from lmpipeline.rag.decisions import (
    RetrieverChoice,
    calibrate_refusal,
    choose_retriever,
    rerank_pays,
)
from lmpipeline.rag.index import (
    CANDIDATES,
    embed,
    embed_stream,
    hybrid,
    pooled,
    search,
    stream_index,
)
from lmpipeline.rag.knowledge import Entry, KnowledgeBase, Questions, silent_on, write_entries
from lmpipeline.rag.lexical import bm25_search
from lmpipeline.rag.reader import GENERATOR_DIR, reader_records, teach_reader
from lmpipeline.rag.rerank import RERANKER_DIR, rerank_rows
from lmpipeline.rag.rerank_train import groups, train_reranker
from lmpipeline.rag.system import ABSENT_ANSWER, INDEX_FILE, Hit, System, SystemConfig
from lmpipeline.runtime import WEIGHTS, from_rank_zero, is_main_process
from lmpipeline.training import LossParts, checkpoint_dir, throughput, train_resumable

# 1 / temperature 0.05, sentence-transformers' default for in-batch-negative training.
SCALE = 20.0


def load_encoder(path: Path | str, device: torch.device) -> PreTrainedModel:
    """The bare encoder of a model directory: an MLM or pooler head, if any, is not used."""
    with quietly():  # the unused, absent pooler would be reported as "new"
        model = AutoModel.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, **WEIGHTS
        )
    return model.to(device)


def contrastive_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """In-batch-negatives cross-entropy (DPR): each question against every positive of the batch.

    Another question's positive that is also one of this question's golds (a shared or second
    gold chunk) would be counted as a negative; the collator's `not_negative` masks those out.
    """
    q = pooled(model, inputs["q_input_ids"], inputs["q_attention_mask"])
    p = pooled(model, inputs["p_input_ids"], inputs["p_attention_mask"])
    logits = (SCALE * q @ p.T).masked_fill(inputs["not_negative"].to(q.device), float("-inf"))
    targets = torch.arange(len(q), device=q.device)
    return LossParts(
        loss_sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
        predicted=torch.tensor(len(q)),
        correct=(logits.argmax(-1) == targets).sum(),
    )


MINE_DEPTH = 30  # hard negatives come from each retriever's top MINE_DEPTH


@dataclass(frozen=True)
class Pair:
    """A question, its gold entries (the first is its positive) and its hard negatives."""

    question: str
    golds: tuple[int, ...]
    negatives: tuple[int, ...] = ()


def pairs(split: Questions, negatives: Sequence[tuple[int, ...]] | None = None) -> list[Pair]:
    """A pair for each question whose answer a chunk states (the others have no positive)."""
    stated = split.in_corpus()
    mined = negatives or [()] * len(stated.records)
    return [
        Pair(q, tuple(g), n) for q, g, n in zip(stated.questions, stated.golds, mined, strict=True)
    ]


def hard_negatives(
    split: Questions, rankings: Sequence[np.ndarray], entries: Sequence[Entry], n: int
) -> list[tuple[int, ...]]:
    """For each question of `split` (all in corpus), its `n` best-ranked entries by `rankings`
    taken in turn (one retriever's rank 1, the other's rank 1, ...) that are not gold and are
    silent on its answer (`silent_on`)."""
    out = []
    for q, (record, golds) in enumerate(zip(split.records, split.golds, strict=True)):
        chosen: list[int] = []
        for rank in range(MINE_DEPTH):
            for ranking in rankings:
                e = int(ranking[q, rank]) if rank < ranking.shape[1] else -1
                if e < 0 or e in golds or e in chosen or len(chosen) == n:
                    continue
                if silent_on(record["answer"], entries[e].text):
                    chosen.append(e)
        out.append(tuple(chosen))
    return out


@dataclass(frozen=True)
class PairCollator:
    """Tokenizes pairs into the inputs of `contrastive_loss`: the questions, then the passages
    (every positive, then every hard negative of the batch) and which passages are not a
    question's negatives (its own golds, other than its positive)."""

    tokenizer: PreTrainedTokenizerBase
    entries: Sequence[Entry]
    max_length: int

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        passages = [p.golds[0] for p in pairs] + [e for p in pairs for e in p.negatives]
        not_negative = torch.tensor([[e in p.golds for e in passages] for p in pairs])
        own = torch.zeros_like(not_negative)
        own[:, : len(pairs)] = torch.eye(len(pairs), dtype=torch.bool)
        batch = {"not_negative": not_negative & ~own}
        for side, texts in (
            ("q", [p.question for p in pairs]),
            ("p", [self.entries[e].text for e in passages]),
        ):
            tokens = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch[f"{side}_input_ids"] = tokens["input_ids"]
            batch[f"{side}_attention_mask"] = tokens["attention_mask"]
        return batch


@dataclass
class Encoder:
    """A candidate start of the retriever, with its embedding of the entries."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    index: faiss.Index
    embed_per_s: float


@dataclass(frozen=True)
class Rankings:
    """Some questions' dense ranking and BM25 one, a row per question, as deep as the fusion
    reads: every first stage of them is fused from these."""

    dense: np.ndarray
    lexical: np.ndarray


def padded(ranked: np.ndarray, depth: int) -> np.ndarray:
    """The first `depth` columns of `ranked`, -1 (nothing) where it has fewer."""
    out = np.full((len(ranked), depth), -1, dtype=np.int64)
    width = min(depth, ranked.shape[1])
    out[:, :width] = ranked[:, :width]
    return out


def halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Positions 0..n-1 cut in two halves drawn with `seed`, each in order (the folds of the
    cross-fitting)."""
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[: n // 2].tolist()), sorted(order[n // 2 :].tolist())


class CptSftBackend:
    """The `Backend` that fine-tunes a sentence encoder as the retriever of the SFT generator,
    chooses the first stage and the reranker, and teaches the generator to read and refuse."""

    def __init__(
        self,
        params: Params,
        cpt: Path,
        sft: Path,
        kb: KnowledgeBase,
        train: Questions,
        device: torch.device,
        mode: str | None,
    ) -> None:
        self.params, self.cfg, self.kb, self.device, self.mode = (
            params,
            params.rag,
            kb,
            device,
            mode,
        )
        self.cpt, self.sft = cpt, sft
        self.all_train = train
        self.fit, self.calibration = train.split(self.cfg.calibration_fraction, params.seed)
        self.figures: dict[str, Any] = {}  # what each choice was made on, for metrics/rag.json
        self.timings: dict[str, Any] = {}
        self.candidates: dict[str, Encoder] = {}  # filled by load_model: "cpt", "base"
        self.start = ""  # the candidate fine-tuning starts from
        self.start_mrr: dict[str, float] = {}  # each candidate as it is, on the train questions
        self.after_mrr: dict[str, float] = {}  # each candidate fine-tuned, on a held-apart slice
        self.mined: dict[str, dict[str, tuple[int, ...]]] = {}  # the negatives of each start
        self.first_fold: dict[str, tuple[np.ndarray, Any]] = {}  # fold 1's ranking and speed
        self.index: faiss.Index | None = None  # built by `rank`, from the fine-tuned encoder
        self.embed_per_s = 0.0
        self.choice: RetrieverChoice | None = None  # made by `save`
        self.reranker: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None
        self.rerank_used = False

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.candidates[self.start].tokenizer

    @property
    def depth(self) -> int:
        """How deep first-stage rankings go: past what the reranker, the reader (a passage
        silent on the answer) and the hybrid's fusion read."""
        return max(MINE_DEPTH, self.cfg.rerank.candidates, self.cfg.top_k)

    # --- the retriever ---------------------------------------------------------------------

    def load_model(self) -> PreTrainedModel:
        """The encoder fine-tuning starts from (module docstring: Start)."""
        loaded = {
            "cpt": (
                load_encoder(self.cpt, self.device),
                AutoTokenizer.from_pretrained(self.cpt, trust_remote_code=False),
            ),
            "base": self.load_base(),
        }
        for name, (model, tokenizer) in loaded.items():
            self.candidates[name] = self.embed_entries(model, tokenizer, name)
        stated = self.all_train.in_corpus()
        for name in loaded:
            ranked = self.dense_ranks(self.candidates[name], stated.questions)
            self.start_mrr[name] = retrieval_scores(gold_ranks(ranked, stated.golds))["mrr"]
        choice = self.cfg.start_encoder
        if choice == "auto" and self.cfg.train.enabled:
            choice = self.start_after_fine_tuning()
        elif choice == "auto":  # used as it is: compared as it is, the base encoder on a tie
            choice = "cpt" if self.start_mrr["cpt"] > self.start_mrr["base"] else "base"
        self.start = choice
        self.mine()
        after = "".join(f", {k} {v:.3f}" for k, v in self.after_mrr.items())
        print(
            f"rag: fine-tuning starts from the {choice} encoder (train-question MRR as is: cpt"
            f" {self.start_mrr['cpt']:.3f}, base {self.start_mrr['base']:.3f}"
            f"{'; fine-tuned, on a held-apart fit half' + after if after else ''}); fit"
            f" {len(self.fit.records)}, calibration {len(self.calibration.records)} questions"
        )
        return self.candidates[choice].model

    def start_after_fine_tuning(self) -> str:
        """The candidate whose retriever, fine-tuned on one half of the fit questions (fold 1 of
        the cross-fitting, trained as the final one is), ranks the other half's golds better
        (MRR); the base encoder on a tie. Masked-LM CPT can rank worse as is and better once
        fine-tuned (domain adaptation for dense retrieval: GPL, Wang et al. 2022), so the
        candidates are compared where the retriever will be used: after fine-tuning. Fold 1 of
        the chosen start is then reused by the cross-fitting."""
        ranked_half, trained_half = halves(len(self.fit.records), self.params.seed)
        ranked, trained = self.fit.subset(ranked_half), self.fit.subset(trained_half).in_corpus()
        for name in ("cpt", "base"):
            self.start = name  # what the fold below trains from, and its negatives
            self.mine()
            # Every rank of a distributed run trains it (the retriever's training follows,
            # on every rank, from the start chosen here); rank 0 alone ranks and chooses.
            model, speed = self.fold_retriever(trained, 1, keep_group=True)
            if not is_main_process():
                continue
            encoder = self.embed_entries(model, self.tokenizer, f"fold 1 from {name}")
            dense = self.rankings(encoder, ranked.questions).dense
            self.first_fold[name] = (dense, speed)
            stated = ranked.stated_rows
            scores = gold_ranks(dense[stated], [ranked.golds[n] for n in stated])
            self.after_mrr[name] = retrieval_scores(scores)["mrr"]
            del model, encoder
            gc.collect()
        wins = is_main_process() and self.after_mrr["cpt"] > self.after_mrr["base"]
        return from_rank_zero("cpt" if wins else "base")

    def load_base(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        source = resolve_model(self.params.cpt.model)
        return load_model(AutoModel, source).to(self.device), load_tokenizer(source)

    def load_start(self) -> PreTrainedModel:
        """A fresh copy of the encoder fine-tuning starts from (a fold's start)."""
        if self.start == "cpt":
            return load_encoder(self.cpt, self.device)
        return self.load_base()[0]

    def base_ranks(self, model: PreTrainedModel, questions: Sequence[str]) -> dict[str, np.ndarray]:
        ranked = {name: self.dense_ranks(c, questions) for name, c in self.candidates.items()}
        for name in [n for n in self.candidates if n != self.start]:
            del self.candidates[name]  # only the start is still needed
        return {"base": ranked["base"], "cpt": ranked["cpt"]}

    def training(self, train: Questions, held_out: Questions) -> Training:
        """Pairs of the fit questions whose answer a chunk states, with hard negatives (the
        calibration questions stay apart: they decide); held-out pairs (the eval loss) have
        in-batch negatives only."""
        return Training(
            loss_fn=contrastive_loss,
            collator=self.collator(),
            train=self.fit_pairs(self.fit.in_corpus()),
            held_out=pairs(held_out),
        )

    @property
    def negatives(self) -> dict[str, tuple[int, ...]]:
        """The hard negatives of each fit question, mined for the start (`mine`)."""
        return self.mined.get(self.start, {})

    def mine(self) -> None:
        """`rag.train.hard_negatives` for each fit question, from BM25's ranking and the
        start's; mined once per start (the start choice mines for both candidates)."""
        n, stated = self.cfg.train.hard_negatives, self.fit.in_corpus()
        if n and self.cfg.train.enabled and self.start not in self.mined:
            lexical = bm25_search(self.kb.bm25, stated.questions, MINE_DEPTH)[1]
            dense = self.dense_ranks(self.candidates[self.start], stated.questions, MINE_DEPTH)
            mined = hard_negatives(stated, [dense, lexical], self.kb.entries, n)
            self.mined[self.start] = dict(zip(stated.questions, mined, strict=True))

    def collator(self) -> PairCollator:
        return PairCollator(self.tokenizer, self.kb.entries, self.cfg.max_length)

    def fit_pairs(self, stated: Questions) -> list[Pair]:
        """Pairs of fit questions (all in corpus), with the negatives mined for them."""
        return pairs(stated, [self.negatives.get(q, ()) for q in stated.questions])

    def decisions(self) -> dict[str, Any]:
        start: dict[str, Any] = {"encoder": self.start, "train_mrr": self.start_mrr}
        if self.after_mrr:
            start["fine_tuned_mrr"] = self.after_mrr
        questions = {
            "fit": len(self.fit.records),
            "calibration": len(self.calibration.records),
        }
        return {"start": start, "train_questions": questions, **self.figures}

    def checkpoint_inputs(self) -> list[Path]:
        return sorted(self.cpt.glob("*.safetensors"))

    def rank(self, model: PreTrainedModel, questions: Sequence[str]) -> np.ndarray:
        tuned = self.embed_entries(model, self.tokenizer, "tuned")
        self.index, self.embed_per_s = tuned.index, tuned.embed_per_s
        return self.dense_ranks(tuned, questions)

    # --- first stage, cross-fitting, reranker --------------------------------------------------

    def rankings(self, encoder: Encoder, questions: Sequence[str]) -> Rankings:
        """What every first stage of `questions` is fused from: `encoder`'s ranking and BM25's."""
        depth = max(self.depth, CANDIDATES)
        dense = padded(self.dense_ranks(encoder, questions, depth), depth)
        return Rankings(dense, bm25_search(self.kb.bm25, questions, depth)[1])

    def fuse(self, rankings: Rankings, kind: str, weight: float | None) -> np.ndarray:
        """The top `depth` entries for each question by the first stage `kind` over
        `rankings`, as the saved system ranks them (-1 pads a short list)."""
        if kind == "bm25":
            return padded(rankings.lexical, self.depth)
        if kind == "dense":
            return padded(rankings.dense, self.depth)
        n, depth = len(self.kb.entries), max(self.depth, CANDIDATES)
        fused = hybrid(
            rankings.dense, rankings.lexical, n, depth, 0.5 if weight is None else weight
        )
        return padded(fused[1], self.depth)

    def choose_first_stage(self, tuned: Encoder, fit: Rankings) -> RetrieverChoice:
        """`rag.retriever` (auto: decisions.choose_retriever) on every train question that has
        a gold: the fit ones through their cross-fitted rankings (`fit`), the calibration ones
        through the fine-tuned retriever. Each was ranked by a retriever that never trained
        on it, and five times the calibration questions alone make a choice between near
        first stages less a matter of which questions the calibration slice drew."""
        rows = self.fit.stated_rows
        stated_fit = Rankings(fit.dense[rows], fit.lexical[rows])
        calibration = self.calibration.in_corpus()
        ranked_calibration = self.rankings(tuned, calibration.questions)
        golds = self.fit.in_corpus().golds + calibration.golds
        choice = choose_retriever(
            self.cfg.retriever,
            lambda kind, weight: np.concatenate(
                [self.fuse(stated_fit, kind, weight), self.fuse(ranked_calibration, kind, weight)]
            ),
            golds,
        )
        scores = "  ".join(f"{k} {v:.3f}" for k, v in choice.scores.items())
        weight = f" (dense weight {choice.weight})" if choice.kind == "hybrid" else ""
        print(
            f"rag: first stage {choice.kind}{weight}; nDCG@10 of {len(golds)} train questions"
            f" ({len(rows)} fit, cross-fitted; {len(calibration.records)} calibration): {scores}"
        )
        counts = {"fit": len(rows), "calibration": len(calibration.records)}
        self.figures["retriever"] = {**choice.figures(), "questions": counts}
        return choice

    def cross_fitted(self) -> Rankings:
        """Each fit question's rankings by BM25 and by a dense retriever trained on the other
        half of the fit questions only: what any first stage of it is fused from."""
        fit = self.fit
        depth = max(self.depth, CANDIDATES)
        dense = np.full((len(fit.records), depth), -1, dtype=np.int64)
        speeds = []
        folds = halves(len(fit.records), self.params.seed)
        for n, (ranked_half, trained_half) in enumerate([folds, folds[::-1]], start=1):
            if n == 1 and self.start in self.first_fold:  # trained to choose the start
                dense[ranked_half], speed = self.first_fold[self.start]
                speeds.append(speed)
                continue
            model, speed = self.fold_retriever(fit.subset(trained_half).in_corpus(), n)
            speeds.append(speed)
            encoder = self.embed_entries(model, self.tokenizer, f"fold {n}")
            dense[ranked_half] = self.rankings(encoder, fit.subset(ranked_half).questions).dense
            del model, encoder
            gc.collect()
        self.timings["folds"] = speeds
        return Rankings(dense, bm25_search(self.kb.bm25, fit.questions, depth)[1])

    def fold_retriever(
        self, stated: Questions, n: int, keep_group: bool = False
    ) -> tuple[PreTrainedModel, Any]:
        """A retriever trained as the final one is, on `stated` (half the fit questions)."""
        model = self.load_start()
        train = self.fit_pairs(stated)
        if not train or not self.cfg.train.enabled:  # too small to halve, or fine-tuning off
            return model, None
        training = Training(contrastive_loss, self.collator(), train, [])
        digests = map(file_digest, self.checkpoint_inputs())
        config = (asdict(self.cfg.train), self.params.seed, self.params.device, self.params.fp16)
        fold = f"rag.fold{n}.{self.start}"  # the starts' folds may share their pairs
        checkpoints = checkpoint_dir(fold, *config, [asdict(p) for p in train], *digests)
        cfg, seed = self.cfg.train, self.params.seed
        trainer = make_trainer(
            model, training, cfg, seed, self.device, self.mode, checkpoints, self.params.launch
        )
        model = train_resumable(trainer, f"rag: fold {n}", keep_group)
        speed = throughput(f"rag: fold {n}", trainer, self.flops_per_token(model), self.device)
        return model, speed

    def rerank(self, questions: Sequence[str], ranked: np.ndarray) -> np.ndarray:
        """Each row's top `rag.rerank.candidates` reordered by the trained reranker."""
        assert self.reranker is not None
        model, tokenizer = self.reranker
        texts = [e.text for e in self.kb.entries]
        cut = ranked[:, : self.cfg.rerank.candidates]
        return rerank_rows(model, tokenizer, questions, cut, texts, self.cfg.rerank.max_length)[1]

    def train_and_decide_reranker(
        self, fit_ranked: np.ndarray, calibration_ranked: np.ndarray
    ) -> None:
        """Train the reranker on the fit questions (negatives from their cross-fitted ranking),
        and use it where `rag.rerank.enabled` says (auto: where it pays on calibration)."""
        cfg = self.cfg.rerank
        if cfg.enabled == "false":
            return
        depth = cfg.candidates
        fit_rows = self.fit.stated_rows
        fit = groups(
            self.fit.in_corpus(), fit_ranked[fit_rows], self.kb.entries, cfg.negatives, depth
        )
        stated = self.calibration.in_corpus()
        held = groups(stated, calibration_ranked, self.kb.entries, cfg.negatives, depth)
        if not fit:
            print("rag: rerank: no fit question has a negative to learn from; no reranker")
            return
        source = resolve_model(self.params.cpt.model)
        tokenizer = load_tokenizer(source)
        digests = [file_digest(p) for p in self.checkpoint_inputs()]
        model, speed, history = train_reranker(
            fit,
            held,
            source,
            tokenizer,
            self.kb.entries,
            self.params,
            self.device,
            self.mode,
            digests,
        )
        self.reranker = (model.eval(), tokenizer)
        self.timings["rerank"] = speed
        before = retrieval_scores(gold_ranks(calibration_ranked[:, :depth], stated.golds))
        after = retrieval_scores(
            gold_ranks(self.rerank(stated.questions, calibration_ranked), stated.golds)
        )
        self.rerank_used = cfg.enabled == "true" or rerank_pays(before, after)
        losses = [e["loss"] for e in history if "loss" in e]
        print(
            f"rag: rerank {'used' if self.rerank_used else 'not used'}: calibration nDCG@10"
            f" {before['ndcg@10']:.3f} -> {after['ndcg@10']:.3f}"
        )
        self.figures["rerank"] = {
            "used": self.rerank_used,
            "candidates": depth,
            "groups": len(fit),
            "train_loss": round(losses[-1], 6) if losses else None,
            "calibration": {"before": before, "after": after},
        }

    # --- the system ----------------------------------------------------------------------------

    def save(self, model: PreTrainedModel, output: Path, bm25: bm25s.BM25) -> int:
        """Choose the first stage and the reranker, write everything `CptSftSystem` reads, and
        teach the generator to read (`generator/`) where `rag.reader.enabled`."""
        assert self.index is not None, "rank() builds the index"
        tuned = Encoder(model, self.tokenizer, self.index, self.embed_per_s)
        with phase(self.timings, "folds"):
            fit = self.cross_fitted()
        with phase(self.timings, "choose"):
            self.choice = choice = self.choose_first_stage(tuned, fit)
        fit_ranked = self.fuse(fit, choice.kind, choice.weight)
        with phase(self.timings, "rerank"):
            stated = self.calibration.in_corpus()
            ranked = self.fuse(self.rankings(tuned, stated.questions), choice.kind, choice.weight)
            self.train_and_decide_reranker(fit_ranked, ranked)
        output.mkdir(parents=True, exist_ok=True)
        save_pretrained(output / RETRIEVER_DIR, model, self.tokenizer)
        faiss.write_index(self.index, str(output / INDEX_FILE))
        bm25.save(str(output / BM25_DIR), show_progress=False)
        write_entries(output, self.kb.entries)
        config = SystemConfig(
            generator=os.path.relpath(self.sft, output),
            retriever=choice.kind,
            index_type=self.cfg.index,
            top_k=self.cfg.top_k,
            max_length=self.cfg.max_length,
            max_new_tokens=self.cfg.max_new_tokens,
            prompt=RAG_PROMPT,
            passage=PASSAGE,
            closed_book_prompt=CLOSED_BOOK_PROMPT,
            backend=BACKEND,
            fusion_weight=choice.weight,
        )
        if self.rerank_used and self.reranker is not None:
            reranker, tokenizer = self.reranker
            save_pretrained(output / RERANKER_DIR, reranker, tokenizer)
            config = replace(
                config,
                reranker=RERANKER_DIR,
                rerank_candidates=self.cfg.rerank.candidates,
                rerank_max_length=self.cfg.rerank.max_length,
            )
        config.write(output)
        if self.cfg.reader.enabled:
            self.teach_reader(output, config, fit_ranked)
        return self.index.d

    def teach_reader(self, output: Path, config: SystemConfig, fit_ranked: np.ndarray) -> None:
        """Fine-tune the generator on the fit questions with their cross-fitted passages
        (`lmpipeline.rag.reader`), save it and point the config at it; calibrate its refusal
        on the calibration questions, then teach it those questions too (the refit)."""
        refuse = self.cfg.reader.refuse
        config = replace(
            config,
            generator=GENERATOR_DIR,
            closed_book_generator=os.path.relpath(self.sft, output),
            refusal=ABSENT_ANSWER if refuse else None,
        )
        with phase(self.timings, "reader"):
            records = self.reader_examples(config, self.fit, fit_ranked)
            history = self.train_reader(records, self.sft, output, config, "rag.reader")
        system = CptSftSystem.load(output, config, self.params.device)
        ranked = system.rank(self.calibration.questions, self.depth)[1]
        if refuse:
            with phase(self.timings, "calibrate"):
                config = self.calibrate(output, config, system, ranked)
        del system
        gc.collect()
        # Every train question teaches the reader in the end; the threshold, decided before,
        # stays (as a calibrated classifier is refit on all its data once calibrated).
        with phase(self.timings, "refit"):
            refit = self.reader_examples(config, self.calibration, ranked)
            if refit:
                self.train_reader(refit, output / GENERATOR_DIR, output, config, "rag.refit")
        losses = [e["loss"] for e in history if "loss" in e]
        absent = [r["response"] == ABSENT_ANSWER for r in records + refit]
        self.figures["reader"] = {
            "examples": len(records) + len(refit),
            "absent": sum(absent),
            "refit_examples": len(refit),
            "train_loss": round(losses[-1], 6) if losses else None,
        }

    def reader_examples(
        self, config: SystemConfig, questions: Questions, ranked: np.ndarray
    ) -> list[dict[str, str]]:
        """`reader_records` of `questions` with their passages from `ranked`, fitted to the
        generator's context as `ask` fits them."""
        tokenizer, _ = load_chat_tokenizer(self.sft)
        budget = CptSftSystem.prompt_budget_of(self.sft, config, tokenizer)
        return reader_records(
            questions,
            ranked,
            self.kb.entries,
            config,
            tokenizer,
            budget,
            self.cfg.reader.refuse,
            self.params.seed,
        )

    def train_reader(
        self,
        records: list[dict[str, str]],
        start: Path,
        output: Path,
        config: SystemConfig,
        family: str,
    ) -> list[dict[str, Any]]:
        """Train the causal LM in `start` on `records`, save it as the generator, write
        `config`; its loss log (its speed goes into the timings under `family`)."""
        tokenizer, _ = load_chat_tokenizer(self.sft)
        inputs = sorted(start.glob("*.safetensors"))
        generator, speed, history = teach_reader(
            records, start, tokenizer, self.params, self.device, self.mode, inputs, family
        )
        # Written beside, then swapped in: `start` may be the generator directory itself, whose
        # files the loaded model may still map.
        staged = output / f"{GENERATOR_DIR}.new"
        shutil.rmtree(staged, ignore_errors=True)
        save_pretrained(staged, generator, tokenizer)
        shutil.rmtree(output / GENERATOR_DIR, ignore_errors=True)
        staged.rename(output / GENERATOR_DIR)
        config.write(output)
        self.timings[family.removeprefix("rag.")] = speed
        del generator
        gc.collect()
        return history

    def calibrate(
        self, output: Path, config: SystemConfig, system: CptSftSystem, ranked: np.ndarray
    ) -> SystemConfig:
        """The refusal threshold (`decisions.calibrate_refusal`) on the calibration questions,
        answered as the saved `system` answers them (`ranked`: its ranking of them); written
        into the config."""
        questions, k = self.calibration, config.top_k
        found = [[self.kb.entries[e] for e in row[:k] if e >= 0] for row in ranked]
        budget, tokenizer = system.prompt_budget(), system.generator_tokenizer
        prompts = [
            fitted_prompt(config, q, [Hit(e, 0.0) for e in f], tokenizer, budget)
            for q, f in zip(questions.questions, found, strict=True)
        ]
        # The threshold is not set yet: every output is the best answer that is not the refusal.
        size = self.cfg.batch_size
        read = [o for i in range(0, len(prompts), size) for o in system.read(prompts[i : i + size])]
        answers, logprobs = [a for a, _ in read], [float(lp or 0.0) for _, lp in read]
        shown = [[int(e) for e in row[:k] if e >= 0] for row in ranked]
        calibration = calibrate_refusal(questions, shown, logprobs, answers)
        threshold = None if calibration.threshold is None else round(calibration.threshold, 6)
        config = replace(config, refusal_threshold=threshold)
        config.write(output)
        self.figures["refusal"] = {"threshold": threshold, "calibration": calibration.figures}
        print(f"rag: refusal threshold {threshold}; calibration {calibration.figures}")
        return config

    def final_ranks(self, questions: Sequence[str], dense: np.ndarray) -> dict[str, np.ndarray]:
        """The held-out rankings besides the dense one, as metrics name them: BM25; the hybrid
        (the one used, else the best of calibration); the first stage used, reranked (where a
        reranker was trained); and `system`, what the saved system retrieves."""
        assert self.choice is not None
        choice, n = self.choice, len(self.kb.entries)
        lexical = bm25_search(self.kb.bm25, questions, n)[1]
        weight = choice.weight if choice.kind == "hybrid" else choice.best_hybrid
        out = {"bm25": lexical, "hybrid": hybrid(dense, lexical, n, n, weight)[1]}
        first = {"dense": dense, **out}[choice.kind]
        if self.reranker is not None:
            out["reranked"] = self.rerank(questions, first)
        out["system"] = out["reranked"] if self.rerank_used else first
        return out

    def flops_per_token(self, model: PreTrainedModel) -> float:
        """6 x the encoder's non-embedding parameters per question or entry token."""
        return 6.0 * model.num_parameters(exclude_embeddings=True)

    def discard(self) -> None:
        """Nothing: this backend writes only on rank 0."""

    def load(self, output: Path, device: str) -> System:
        return CptSftSystem.load(output, SystemConfig.read(output), device)

    def embed_entries(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, label: str
    ) -> Encoder:
        """`model` with its index of every entry, and entries embedded and indexed per second."""
        cfg, n = self.cfg, len(self.kb.entries)
        start = time.perf_counter()
        # Streamed: the entries' tokens and vectors go to the index a window at a time.
        blocks = embed_stream(
            model,
            tokenizer,
            (e.text for e in self.kb.entries),
            cfg.max_length,
            cfg.batch_size,
            f"rag: embed ({label})",
            n,
        )
        index = stream_index(blocks, n, cfg.index)
        return Encoder(model, tokenizer, index, n / (time.perf_counter() - start))

    def dense_ranks(
        self, encoder: Encoder, questions: Sequence[str], depth: int | None = None
    ) -> np.ndarray:
        """The entries ranked for each question by `encoder` (all of them, or the top `depth`)."""
        cfg = self.cfg
        queries = embed(encoder.model, encoder.tokenizer, questions, cfg.max_length, cfg.batch_size)
        return search(encoder.index, queries, depth or encoder.index.ntotal)[1]
