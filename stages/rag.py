"""Stage `rag`: a domain retriever over a FAISS index, and answers grounded in what it finds.

This module is the stage's entry point and its default backend, `cpt-sft`. The knowledge base
(`stages.retrieval`) holds the validated pretrain passages in chunks and every answer of the RAG
data as a question's gold entry. The retriever is the CPT encoder, mean-pooled and L2-normalized,
fine-tuned DPR-style on the train questions: each question's gold entry is its positive, the other
golds of the batch its negatives. Retrieval is scored on the held-out questions for the base
encoder, the CPT encoder, the fine-tuned one, BM25 and a hybrid of the last two; the SFT model then
answers every held-out question closed-book and with the top passages in its prompt. With
`rag.backend: rag-sequence` the stage runs `stages.rag_sequence` instead, into the same metrics.

`output/rag` holds all that answering needs (retriever, index, passages, BM25 index, config naming
the generator), so `python -m stages.rag ask "..."` and `load_system("output/rag")` work without
anything else from the training run, whichever backend built it.

    python -m stages.rag build --cpt output/cpt --sft output/sft --data output/data/rag \
        --pretrain output/data/pretrain.txt --output output/rag --metrics metrics/rag.json \
        --plots metrics/rag --predictions metrics/rag_predictions.jsonl
    python -m stages.rag ask "What label smoothing value did the original Transformer use?"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import bm25s
import faiss
import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from transformers.utils import logging as hf_logging

from stages import rag_sequence
from stages.data import file_digest, read_jsonl, write_jsonl, write_text_atomic
from stages.launch import exit_process, is_main_process, relaunch
from stages.models import load_model, load_tokenizer, resolve_model
from stages.params import LaunchParams, Params, RagParams, load_stage_params
from stages.retrieval import (
    CANDIDATES,
    Answer,
    Entry,
    Hit,
    KnowledgeBase,
    bm25_search,
    build_index,
    embed,
    fuse,
    gold_ranks,
    knowledge_base,
    lexical_ranks,
    pooled,
    print_retrieval,
    retriever_training,
    score_system,
    search,
)
from stages.runtime import SetupError, precision, resolve_device
from stages.sft import ensure_chat_template, generate, prompt_text
from stages.training import (
    EpochSampler,
    LossParts,
    StageResult,
    StageTrainer,
    add_timings_option,
    checkpoint_dir,
    run_and_record,
    score,
    throughput,
    train_resumable,
    training_args,
)

# The references are short facts, so both modes ask for one sentence; they differ by the passages.
RAG_PROMPT = (
    "Answer the question in one short sentence, using the passages.\n\n{passages}\n\n"
    "Question: {question}"
)
CLOSED_BOOK_PROMPT = "Answer the question in one short sentence.\n\nQuestion: {question}"
PASSAGE = "Passage {n}: {text}"
# 1 / temperature 0.05, sentence-transformers' default for in-batch-negative training.
SCALE = 20.0
# --- retriever fine-tuning ---------------------------------------------------------------------


def contrastive_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """In-batch-negatives cross-entropy (DPR): each question against every gold of the batch.

    Two questions that share a gold entry would count it as each other's negative; those
    off-diagonal pairs are masked out.
    """
    q = pooled(model, inputs["q_input_ids"], inputs["q_attention_mask"])
    p = pooled(model, inputs["p_input_ids"], inputs["p_attention_mask"])
    gold = inputs["gold"]
    same = (gold[:, None] == gold[None, :]) & ~torch.eye(len(gold), dtype=torch.bool).to(q.device)
    logits = (SCALE * q @ p.T).masked_fill(same, float("-inf"))
    targets = torch.arange(len(gold), device=q.device)
    return LossParts(
        loss_sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
        predicted=torch.tensor(len(gold)),
        correct=(logits.argmax(-1) == targets).sum(),
    )


@dataclass(frozen=True)
class PairCollator:
    """Tokenizes (question, gold entry) pairs into the inputs of `contrastive_loss`."""

    tokenizer: PreTrainedTokenizerBase
    entries: Sequence[Entry]
    max_length: int

    def __call__(self, pairs: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {"gold": torch.tensor([g for _, g in pairs])}
        for side, texts in (
            ("q", [q for q, _ in pairs]),
            ("p", [self.entries[g].text for _, g in pairs]),
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


def finetune_retriever(
    encoder: PreTrainedModel,
    collator: PairCollator,
    train: list[tuple[str, int]],
    held_out: list[tuple[str, int]],
    cfg: RagParams,
    seed: int,
    device: torch.device,
    mode: str | None,
    checkpoints: Path,
    launch: LaunchParams = LaunchParams(),
) -> tuple[torch.nn.Module, StageTrainer]:
    """Contrastive fine-tuning of `encoder`; returns the trained encoder (whole on rank 0) and
    the trainer, for its history."""
    train_cfg = retriever_training(cfg)
    batches = [
        collator(held_out[i : i + train_cfg.batch_size])
        for i in range(0, len(held_out), train_cfg.batch_size)
    ]
    trainer = StageTrainer(
        model=encoder,
        args=training_args(train_cfg, seed, device, mode, checkpoints, len(train), launch),
        train_dataset=train,
        eval_dataset=batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        data_collator=collator,
        loss_fn=contrastive_loss,
        eval_fn=lambda m: {"eval_loss": score(contrastive_loss, m, batches)[0]},
        sampler=EpochSampler(len(train), seed),
    )
    return train_resumable(trainer, "rag"), trainer


# --- the answering system ----------------------------------------------------------------------


@dataclass(frozen=True)
class RagConfig:
    """output/rag/config.json: what `RagSystem.load` needs besides the files next to it."""

    generator: str  # generator directory, relative to the rag directory
    retriever: str  # dense|bm25|hybrid
    index_type: str
    top_k: int
    max_length: int
    max_new_tokens: int
    prompt: str = RAG_PROMPT
    passage: str = PASSAGE
    closed_book_prompt: str = CLOSED_BOOK_PROMPT
    backend: str = "cpt-sft"


def rag_prompt(
    config: RagConfig, question: str, hits: Sequence[Hit], max_words: int | None = None
) -> str:
    """The generator's prompt, each passage cut to its first `max_words` words if given."""
    passages = "\n\n".join(
        config.passage.format(n=n, text=" ".join(h.entry.text.split()[:max_words]))
        for n, h in enumerate(hits, start=1)
    )
    return config.prompt.format(passages=passages, question=question)


def fitted_prompt(
    config: RagConfig,
    question: str,
    hits: Sequence[Hit],
    tokenizer: PreTrainedTokenizerBase,
    budget: int | None,
) -> str:
    """The prompt, with passages shortened (halving their words) until its chat rendering fits
    `budget` tokens: a generator with a short context (GPT-2: 1,024) still gets every passage."""
    max_words = max((len(h.entry.text.split()) for h in hits), default=0)
    while True:
        prompt = rag_prompt(config, question, hits, max_words)
        rendered = prompt_text(tokenizer, prompt)
        if budget is None or max_words <= 1 or len(tokenizer(rendered)["input_ids"]) <= budget:
            return prompt
        max_words //= 2


class RagSystem:
    """Retriever, index and generator loaded from a rag directory; `ask` answers a question."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path = path
        self.config = RagConfig(**json.loads((path / "config.json").read_text(encoding="utf-8")))
        self.entries = [Entry(r["id"], r["text"]) for r in read_jsonl(path / "passages.jsonl")]
        self.tokenizer = AutoTokenizer.from_pretrained(path / "retriever")
        self.encoder = AutoModel.from_pretrained(path / "retriever", use_safetensors=True)
        self.encoder.to(device).eval()
        self.index = faiss.read_index(str(path / "index.faiss"))
        self.bm25 = bm25s.BM25.load(str(path / "bm25"), show_progress=False)
        generator = (path / self.config.generator).resolve()
        self.generator_tokenizer = AutoTokenizer.from_pretrained(generator)
        ensure_chat_template(self.generator_tokenizer)
        if self.generator_tokenizer.pad_token is None:
            self.generator_tokenizer.pad_token = self.generator_tokenizer.eos_token
        self.generator = AutoModelForCausalLM.from_pretrained(generator, use_safetensors=True)
        self.generator.to(device).eval()

    @classmethod
    def load(cls, path: Path | str = "output/rag", device: str = "auto") -> RagSystem:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise SetupError(f"{path} holds no RAG system (no config.json): run `dvc repro rag`")
        generator = path / json.loads((path / "config.json").read_text())["generator"]
        if not (generator / "config.json").is_file():
            raise SetupError(
                f"{path}/config.json names the generator {generator}, which holds no model:"
                " keep output/rag next to output/sft (`dvc pull` or `dvc repro sft`)"
            )
        return cls(path, resolve_device(device))

    def rank(self, questions: Sequence[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, entry indices) of the configured retriever for each question."""
        kind = self.config.retriever
        if kind == "bm25":
            return bm25_search(self.bm25, questions, depth)
        vectors = embed(self.encoder, self.tokenizer, questions, self.config.max_length, 32)
        dense = search(self.index, vectors, max(depth, CANDIDATES))
        if kind == "dense":
            return dense[0][:, :depth], dense[1][:, :depth]
        lexical = bm25_search(self.bm25, questions, max(depth, CANDIDATES))
        return fuse([dense[1], lexical[1]], len(self.entries), depth)

    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        scores, ids = self.rank([question], k or self.config.top_k)
        return [
            Hit(self.entries[i], float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0
        ]

    def closed_book(self, questions: Sequence[str], batch_size: int) -> list[str]:
        """The generator's answers without passages, in the same prompt format otherwise."""
        prompts = [self.config.closed_book_prompt.format(question=q) for q in questions]
        return generate(
            self.generator,
            self.generator_tokenizer,
            prompts,
            self.config.max_new_tokens,
            batch_size,
        )

    def ask(self, question: str, k: int | None = None) -> Answer:
        hits = self.retrieve(question, k)
        context = getattr(self.generator.config, "max_position_embeddings", None)
        budget = context - self.config.max_new_tokens if context else None
        prompt = fitted_prompt(self.config, question, hits, self.generator_tokenizer, budget)
        text = generate(
            self.generator, self.generator_tokenizer, [prompt], self.config.max_new_tokens, 1
        )[0]
        return Answer(question, text, hits)


def load_system(
    path: Path | str = "output/rag", device: str = "auto"
) -> RagSystem | rag_sequence.RagSequenceSystem:
    """The answering system a rag directory holds, whichever backend built it."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SetupError(f"{path} holds no RAG system (no config.json): run `dvc repro rag`")
    backend = json.loads((path / "config.json").read_text(encoding="utf-8")).get("backend")
    if backend == rag_sequence.BACKEND:
        return rag_sequence.RagSequenceSystem.load(path, device)
    return RagSystem.load(path, device)


def save_system(
    output: Path, config: RagConfig, entries: Sequence[Entry], found: Retrievers
) -> None:
    """Everything `RagSystem.load` reads; the generator stays where `config` names it."""
    output.mkdir(parents=True, exist_ok=True)
    found.encoder.save_pretrained(output / "retriever")
    found.tokenizer.save_pretrained(output / "retriever")
    faiss.write_index(found.index, str(output / "index.faiss"))
    found.bm25.save(str(output / "bm25"), show_progress=False)
    write_jsonl(output / "passages.jsonl", (asdict(e) for e in entries))
    write_text_atomic(output / "config.json", json.dumps(asdict(config), indent=2) + "\n")


# --- stage -------------------------------------------------------------------------------------


def load_encoder(path: Path | str, device: torch.device) -> PreTrainedModel:
    """The bare encoder of a model directory: an MLM or pooler head, if any, is not used."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused, absent pooler would be reported as "new"
    try:
        return AutoModel.from_pretrained(path, use_safetensors=True).to(device)
    finally:
        hf_logging.set_verbosity(verbosity)


def dense_ranks(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    entries: Sequence[Entry],
    questions: Sequence[str],
    cfg: RagParams,
    label: str,
) -> tuple[np.ndarray, faiss.Index, float]:
    """Full rankings of the entries for `questions`, the index, and entries embedded per second."""
    start = time.perf_counter()
    vectors = embed(
        encoder,
        tokenizer,
        [e.text for e in entries],
        cfg.max_length,
        cfg.batch_size,
        f"rag: embed ({label})",
    )
    per_second = len(entries) / (time.perf_counter() - start)
    index = build_index(vectors, cfg.index)
    queries = embed(encoder, tokenizer, questions, cfg.max_length, cfg.batch_size)
    return search(index, queries, len(entries))[1], index, per_second


@dataclass
class Retrievers:
    """What retriever evaluation leaves: gold ranks per retriever, and the parts to save."""

    ranks: dict[str, np.ndarray]
    encoder: PreTrainedModel  # fine-tuned
    tokenizer: PreTrainedTokenizerBase
    index: faiss.Index
    bm25: bm25s.BM25
    embed_per_s: float
    trainer: StageTrainer


def evaluate_retrievers(
    params: Params,
    kb: KnowledgeBase,
    train_records: list[dict[str, str]],
    eval_records: list[dict[str, str]],
    args: argparse.Namespace,
    device: torch.device,
    mode: str | None,
) -> Retrievers | None:
    """Rank the entries for the held-out questions with each retriever, fine-tuning on the way
    (None on the ranks other than 0 of a distributed run, which only fine-tune)."""
    cfg, entries = params.rag, kb.entries
    questions, gold = [r["question"] for r in eval_records], kb.gold(eval_records)
    ranks: dict[str, np.ndarray] = {}
    tokenizer = AutoTokenizer.from_pretrained(args.cpt)
    encoder = load_encoder(args.cpt, device)
    if is_main_process():  # the other ranks of a distributed run only fine-tune
        source = resolve_model(params.cpt.model)
        base = load_model(AutoModel, source).to(device)
        ranked, _, _ = dense_ranks(base, load_tokenizer(source), entries, questions, cfg, "base")
        ranks["base"] = gold_ranks(ranked, gold)
        del base
        ranked, _, _ = dense_ranks(encoder, tokenizer, entries, questions, cfg, "cpt")
        ranks["cpt"] = gold_ranks(ranked, gold)

    inputs = [args.data / "train.jsonl", args.pretrain, *sorted(args.cpt.glob("*.safetensors"))]
    encoder, trainer = finetune_retriever(
        encoder,
        PairCollator(tokenizer, entries, cfg.max_length),
        list(zip([r["question"] for r in train_records], kb.gold(train_records), strict=True)),
        list(zip(questions, gold, strict=True)),
        cfg,
        params.seed,
        device,
        mode,
        checkpoint_dir(
            "rag",
            asdict(cfg),
            params.seed,
            params.device,
            params.fp16,
            params.launch.strategy,
            *map(file_digest, inputs),
        ),
        params.launch,
    )
    if not is_main_process():
        return None
    dense, index, embed_per_s = dense_ranks(encoder, tokenizer, entries, questions, cfg, "tuned")
    ranks["finetuned"] = gold_ranks(dense, gold)
    bm25, lexical, hybrid = lexical_ranks(entries, questions, dense)
    ranks["bm25"], ranks["hybrid"] = gold_ranks(lexical, gold), gold_ranks(hybrid, gold)
    print_retrieval(ranks)
    return Retrievers(ranks, encoder, tokenizer, index, bm25, embed_per_s, trainer)


def run(params: Params, args: argparse.Namespace) -> StageResult | None:
    """Build and evaluate the RAG system; save it to args.output; return metrics and timings."""
    cfg = params.rag
    set_seed(params.seed)
    device = resolve_device(params.device)
    mode = precision(params.fp16, device)
    train_records = read_jsonl(args.data / "train.jsonl")
    eval_records = read_jsonl(args.data / "eval.jsonl")
    passages = args.pretrain.read_text(encoding="utf-8").splitlines()
    kb = knowledge_base(passages, [r["answer"] for r in train_records + eval_records], cfg)
    n_answers = len(kb.answer_entry)
    print(
        f"rag: {len(kb.entries)} entries ({len(kb.entries) - n_answers} passage chunks,"
        f" {n_answers} answers); {len(train_records)} train / {len(eval_records)} held-out"
        f" questions; {device} ({mode or 'fp32'})"
    )
    if cfg.backend == rag_sequence.BACKEND:
        return rag_sequence.run(params, args, kb, train_records, eval_records, device, mode)
    found = evaluate_retrievers(params, kb, train_records, eval_records, args, device, mode)
    if found is None:
        return None
    config = RagConfig(
        generator=os.path.relpath(args.sft, args.output),
        retriever=cfg.retriever,
        index_type=cfg.index,
        top_k=cfg.top_k,
        max_length=cfg.max_length,
        max_new_tokens=cfg.max_new_tokens,
    )
    save_system(args.output, config, kb.entries, found)
    flops = 6.0 * found.encoder.num_parameters(exclude_embeddings=True)
    speed = throughput("rag", found.trainer, flops, device)
    system = RagSystem.load(args.output, params.device)  # what `ask` will load
    metrics, latency = score_system(
        system,
        kb,
        eval_records,
        cfg,
        found.ranks,
        found.trainer.state.log_history,
        found.index.d,
        args.plots,
        args.predictions,
    )
    latency = {"embed_passages_per_s": round(found.embed_per_s, 1), **latency}
    return StageResult(metrics, {"train": speed, "latency": latency})


def ask_main(argv: list[str] | None = None) -> int:
    """`python -m stages.rag ask` and the `rag-ask` console script."""
    parser = argparse.ArgumentParser(description="Answer a question with the trained RAG system")
    parser.add_argument("question")
    parser.add_argument("--rag", type=Path, default=Path("output/rag"), help="rag directory")
    parser.add_argument("--top-k", type=int, default=None, help="passages in the prompt")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # loading bars would bury a one-line answer
    try:
        system = load_system(args.rag, args.device)
    except SetupError as err:
        print(f"ask: {err}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    answer = system.ask(args.question, args.top_k)
    took = time.perf_counter() - start
    print(answer.text)
    print(f"\n({took:.2f} s; {system.config.retriever} retrieval, passages used:)")
    for hit in answer.passages:
        words = hit.entry.text.split()
        preview = " ".join(words[:12]) + (" ..." if len(words) > 12 else "")
        print(f"  [{hit.entry.id}] {hit.score:.3f}  {preview}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ask"]:
        return ask_main(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="`ask QUESTION` answers with a built system"
    )
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--cpt", type=Path, required=True, help="CPT encoder directory")
    parser.add_argument("--sft", type=Path, required=True, help="generator directory")
    parser.add_argument("--data", type=Path, required=True, help="directory with train/eval.jsonl")
    parser.add_argument("--pretrain", type=Path, required=True, help="validated passages")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    add_timings_option(parser, "rag")
    args = parser.parse_args(argv)
    params = load_stage_params(args.params, "rag")
    if (status := relaunch(params.launch, params.device, "stages.rag", argv)) is not None:
        return status
    return run_and_record("rag", lambda: run(params, args), args.metrics, args.timings)


if __name__ == "__main__":
    exit_process(main())
