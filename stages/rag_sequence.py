"""Backend `rag-sequence` of stage `rag`: transformers' RagSequenceForGeneration over the project's
knowledge base.

The entries (see `stages.retrieval.knowledge_base`) are embedded once by the DPR context encoder
`rag.ctx_encoder` into a FAISS index, which a `RagRetriever` with a custom index serves to the
RAG model `rag.model` (DPR question encoder + BART generator, `facebook/rag-sequence-nq` by
default). The model is fine-tuned on the train questions with the RAG-sequence marginal
likelihood, -log sum_z p(z|x) p(y|x,z) over the `top_k` entries it retrieves; as in Lewis et al.
(2020) the context encoder and the index stay fixed, and the question encoder learns through
p(z|x). Retrieval and answers are scored as for the default backend, into the same
`metrics/rag.json` structure; `cpt` has no meaning here and is left out of `retrieval`.

output/rag holds everything `python -m stages.rag ask` needs:
    config.json     backend and answering settings
    model/          the fine-tuned RagSequenceForGeneration and its two tokenizers
    index.faiss     the entries' DPR vectors (inner product)
    kb/             the entries as a datasets.Dataset (title, text, embeddings) for RagRetriever
    passages.jsonl  entry ids and texts
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from datasets import Dataset
from transformers import (
    DPRContextEncoder,
    PreTrainedModel,
    RagRetriever,
    RagSequenceForGeneration,
    RagTokenizer,
)

from stages.data import file_digest, read_jsonl, write_jsonl, write_text_atomic
from stages.launch import is_main_process
from stages.models import load_model, load_tokenizer, resolve_model
from stages.params import Params, RagParams
from stages.retrieval import (
    Answer,
    Entry,
    Hit,
    KnowledgeBase,
    build_index,
    embed,
    gold_ranks,
    lexical_ranks,
    print_retrieval,
    retriever_training,
    score_system,
    search,
)
from stages.runtime import SetupError, resolve_device
from stages.training import (
    EpochSampler,
    LossParts,
    StageResult,
    StageTrainer,
    checkpoint_dir,
    score,
    train_resumable,
    training_args,
)

BACKEND = "rag-sequence"


def dpr_pooled(
    encoder: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """DPR's vector: the [CLS] state (through the projection, if the encoder has one)."""
    return encoder(input_ids=input_ids, attention_mask=mask).pooler_output


# --- model, knowledge base and retriever -------------------------------------------------------


def load_rag(ref: str, n_docs: int) -> tuple[RagSequenceForGeneration, RagTokenizer]:
    """The RAG model and tokenizers of `ref`, set to marginalize over `n_docs` documents of a
    custom index."""
    source = resolve_model(ref)
    if not (source.path / "question_encoder_tokenizer").is_dir():
        raise SetupError(
            f"rag.model '{ref}' is not a RAG model directory (no question_encoder_tokenizer/):"
            " save one with RagSequenceForGeneration.save_pretrained and"
            " RagTokenizer.save_pretrained"
        )
    model = load_model(RagSequenceForGeneration, source)
    # The hub models name the wiki_dpr index; ours is the project's knowledge base, whose paths
    # are given when a retriever is made (`kb_retriever`), never saved with the model.
    model.config.index_name = "custom"
    model.config.passages_path = model.config.index_path = None
    model.config.n_docs = n_docs
    return model, RagTokenizer.from_pretrained(source.path)


def embed_entries(entries: Sequence[Entry], cfg: RagParams, device: torch.device) -> np.ndarray:
    """The entries' vectors from the DPR context encoder `cfg.ctx_encoder`."""
    source = resolve_model(cfg.ctx_encoder)
    encoder = load_model(DPRContextEncoder, source).to(device)
    texts = [e.text for e in entries]
    vectors = embed(
        encoder,
        load_tokenizer(source),
        texts,
        cfg.max_length,
        cfg.batch_size,
        "rag: embed (DPR context encoder)",
        dpr_pooled,
    )
    del encoder
    return vectors


def save_kb(path: Path, entries: Sequence[Entry], vectors: np.ndarray, index: faiss.Index) -> None:
    """The index, and the entries as the datasets.Dataset that a custom RagRetriever reads.

    The entries have no titles: the generator sees ' / text // question'."""
    path.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path / "index.faiss"))
    kb = Dataset.from_dict(
        {"title": [""] * len(entries), "text": [e.text for e in entries], "embeddings": vectors}
    )
    kb.save_to_disk(str(path / "kb"))
    write_jsonl(path / "passages.jsonl", (asdict(e) for e in entries))


def kb_retriever(
    model: RagSequenceForGeneration, tokenizer: RagTokenizer, path: Path
) -> RagRetriever:
    """A RagRetriever over the index and entries saved in `path` by `save_kb`."""
    config = copy.deepcopy(model.config)
    config.passages_path, config.index_path = str(path / "kb"), str(path / "index.faiss")
    return RagRetriever(config, tokenizer.question_encoder, tokenizer.generator)


def question_vectors(
    model: RagSequenceForGeneration,
    tokenizer: RagTokenizer,
    questions: Sequence[str],
    cfg: RagParams,
) -> np.ndarray:
    return embed(
        model.question_encoder,
        tokenizer.question_encoder,
        questions,
        cfg.max_length,
        cfg.batch_size,
        pool=dpr_pooled,
    )


# --- fine-tuning -------------------------------------------------------------------------------


def marginal_nll(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """The RAG-sequence loss summed over the batch's questions, counted per answer token.

    The model retrieves its documents itself; `correct` counts the answer tokens that the
    best-scored document's generator predicts."""
    labels = inputs["labels"]
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=labels,
        reduce_loss=False,
    )
    # The generator reads the labels as decoder input; each position predicts the next label.
    target = labels[:, 1:]
    real = target != model.config.generator.pad_token_id
    logits = out.logits.view(len(labels), -1, *out.logits.shape[1:])
    best = logits[torch.arange(len(labels)), out.doc_scores.argmax(1), :-1]
    return LossParts(
        loss_sum=out.loss.sum(),
        predicted=real.sum(),
        correct=((best.argmax(-1) == target) & real).sum(),
    )


@dataclass(frozen=True)
class QACollator:
    """Tokenizes (question, answer) pairs: questions for the question encoder, answers for the
    generator."""

    tokenizer: RagTokenizer
    max_length: int

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        kwargs = {"padding": True, "truncation": True, "max_length": self.max_length}
        questions = self.tokenizer.question_encoder(
            [q for q, _ in pairs], return_tensors="pt", **kwargs
        )
        answers = self.tokenizer.generator([a for _, a in pairs], return_tensors="pt", **kwargs)
        return {
            "input_ids": questions["input_ids"],
            "attention_mask": questions["attention_mask"],
            "labels": answers["input_ids"],
        }


def make_trainer(
    model: RagSequenceForGeneration,
    collator: QACollator,
    train: list[tuple[str, str]],
    held_out: list[tuple[str, str]],
    params: Params,
    device: torch.device,
    mode: str | None,
    checkpoints: Path,
) -> StageTrainer:
    """The trainer of marginal-likelihood fine-tuning of `model` in place."""
    train_cfg = retriever_training(params.rag)
    batches = [
        collator(held_out[i : i + train_cfg.batch_size])
        for i in range(0, len(held_out), train_cfg.batch_size)
    ]
    return StageTrainer(
        model=model,
        args=training_args(
            train_cfg, params.seed, device, mode, checkpoints, len(train), params.launch
        ),
        train_dataset=train,
        eval_dataset=batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        data_collator=collator,
        loss_fn=marginal_nll,
        eval_fn=lambda m: {"eval_loss": score(marginal_nll, m, batches)[0]},
        sampler=EpochSampler(len(train), params.seed),
    )


# --- the answering system ----------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceConfig:
    """output/rag/config.json of this backend."""

    top_k: int
    max_length: int
    max_new_tokens: int
    index_type: str
    backend: str = BACKEND
    retriever: str = "dense"
    model: str = "model"  # directory of the RAG model, relative to the rag directory


class RagSequenceSystem:
    """The fine-tuned RAG model with its retriever, loaded from a rag directory."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.config = SequenceConfig(**json.loads((path / "config.json").read_text()))
        self.entries = [Entry(r["id"], r["text"]) for r in read_jsonl(path / "passages.jsonl")]
        self.tokenizer = RagTokenizer.from_pretrained(path / self.config.model)
        self.model = RagSequenceForGeneration.from_pretrained(
            path / self.config.model, use_safetensors=True
        )
        self.model.set_retriever(kb_retriever(self.model, self.tokenizer, path))
        self.model.to(device).eval()
        self.index = faiss.read_index(str(path / "index.faiss"))

    @classmethod
    def load(cls, path: Path, device: str = "auto") -> RagSequenceSystem:
        if not (path / "model" / "config.json").is_file():
            raise SetupError(f"{path} holds no RAG model (no model/config.json): rerun the stage")
        return cls(path, resolve_device(device))

    def _questions(self, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer.question_encoder(
            list(questions),
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        ).to(self.model.device)

    @torch.no_grad()
    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        inputs = self._questions([question])
        vectors = self.model.question_encoder(**inputs).pooler_output.float().cpu().numpy()
        scores, ids = search(self.index, vectors, k or self.config.top_k)
        return [
            Hit(self.entries[i], float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0
        ]

    @torch.no_grad()
    def closed_book(self, questions: Sequence[str], batch_size: int) -> list[str]:
        """The BART generator's answers to the bare questions, without documents."""
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            inputs = self.tokenizer.generator(
                list(questions[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.config.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            out = self.model.generator.generate(
                **inputs, max_new_tokens=self.config.max_new_tokens, num_beams=1, do_sample=False
            )
            answers += [
                a.strip()
                for a in self.tokenizer.generator.batch_decode(out, skip_special_tokens=True)
            ]
        return answers

    @torch.no_grad()
    def ask(self, question: str, k: int | None = None) -> Answer:
        """RAG-sequence decoding: an answer per retrieved document, the one with the highest
        marginal likelihood kept."""
        k = k or self.config.top_k
        inputs = self._questions([question])
        out = self.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            n_docs=k,
            num_beams=1,
            max_new_tokens=self.config.max_new_tokens,
        )
        text = self.tokenizer.generator.batch_decode(out, skip_special_tokens=True)[0].strip()
        return Answer(question, text, self.retrieve(question, k))


# --- stage -------------------------------------------------------------------------------------


def run(
    params: Params,
    args: argparse.Namespace,
    kb: KnowledgeBase,
    train_records: list[dict[str, str]],
    eval_records: list[dict[str, str]],
    device: torch.device,
    mode: str | None,
) -> StageResult | None:
    """Index the knowledge base, fine-tune and score the RAG model; save it to args.output."""
    cfg, entries = params.rag, kb.entries
    questions, gold = [r["question"] for r in eval_records], kb.gold(eval_records)
    model, tokenizer = load_rag(cfg.model, cfg.top_k)
    start = time.perf_counter()
    vectors = embed_entries(entries, cfg, device)
    embed_per_s = len(entries) / (time.perf_counter() - start)
    if vectors.shape[1] != model.config.retrieval_vector_size:
        raise SetupError(
            f"rag.ctx_encoder '{cfg.ctx_encoder}' gives {vectors.shape[1]}-dimensional vectors,"
            f" rag.model '{cfg.model}' expects {model.config.retrieval_vector_size}"
        )
    index = build_index(vectors, cfg.index)
    # Every process of a distributed run retrieves while training, from its own copy.
    kb_dir = args.output if is_main_process() else Path(tempfile.mkdtemp(prefix="rag-kb-"))
    save_kb(kb_dir, entries, vectors, index)
    model.set_retriever(kb_retriever(model, tokenizer, kb_dir))
    model.to(device)

    ranks: dict[str, np.ndarray] = {}
    if is_main_process():
        base = search(index, question_vectors(model, tokenizer, questions, cfg), len(entries))[1]
        ranks["base"] = gold_ranks(base, gold)
    inputs = [args.data / "train.jsonl", args.pretrain]
    trainer = make_trainer(
        model,
        QACollator(tokenizer, cfg.max_length),
        [(r["question"], r["answer"]) for r in train_records],
        [(r["question"], r["answer"]) for r in eval_records],
        params,
        device,
        mode,
        checkpoint_dir(
            BACKEND, asdict(cfg), params.seed, params.device, params.fp16, *map(file_digest, inputs)
        ),
    )
    model = train_resumable(trainer, "rag")
    if not is_main_process():
        shutil.rmtree(kb_dir)
        return None
    dense = search(index, question_vectors(model, tokenizer, questions, cfg), len(entries))[1]
    ranks["finetuned"] = gold_ranks(dense, gold)
    _, lexical, hybrid = lexical_ranks(entries, questions, dense)
    ranks["bm25"], ranks["hybrid"] = gold_ranks(lexical, gold), gold_ranks(hybrid, gold)
    print_retrieval(ranks)

    model.save_pretrained(args.output / "model")
    tokenizer.save_pretrained(args.output / "model")
    config = SequenceConfig(cfg.top_k, cfg.max_length, cfg.max_new_tokens, cfg.index)
    write_text_atomic(args.output / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    speed = {
        "steps": trainer.state.global_step,
        "runtime_s": round(trainer.step_seconds, 2),
        "s_per_step": round(trainer.step_seconds / max(trainer.state.global_step, 1), 3),
    }
    history = trainer.state.log_history
    del model, trainer  # with its optimizer state: rag-sequence-nq's would double peak memory
    gc.collect()
    system = RagSequenceSystem.load(args.output, params.device)  # what `ask` will load
    metrics, latency = score_system(
        system, kb, eval_records, cfg, ranks, history, index.d, args.plots, args.predictions
    )
    latency = {"embed_passages_per_s": round(embed_per_s, 1), **latency}
    return StageResult(metrics, {"train": speed, "latency": latency})
