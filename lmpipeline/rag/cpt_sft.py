"""The `cpt-sft` RAG system as `ask` loads it: the fine-tuned encoder retrieves (dense, BM25 or a
weighted hybrid), a cross-encoder reorders the first stage's top candidates where one was chosen,
and the SFT model answers with the top passages in its chat prompt, or, taught to read, refuses
where its likelihood of the refusal passes the calibrated threshold (`lmpipeline.rag.refusal`).

Its directory holds `retriever/` (a Hugging Face encoder), `index.faiss`, `bm25/`,
`passages.jsonl`, `reranker/` where one is used, and `config.json`, which names the generator's
directory relative to it (`../sft`, or `generator`). How it is trained is in
`lmpipeline.rag.cpt_sft_train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BatchEncoding,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from lmpipeline.chat import (
    encode_turns,
    generate,
    greedy,
    left_padded,
    load_causal_lm,
    load_chat_tokenizer,
    prompt_text,
)
from lmpipeline.errors import SetupError
from lmpipeline.rag.index import CANDIDATES, embed, hybrid, search
from lmpipeline.rag.lexical import bm25_search
from lmpipeline.rag.refusal import NoRefusal, Prefilled, prefill, response_ids
from lmpipeline.rag.rerank import load_reranker, rerank_rows
from lmpipeline.rag.system import (
    Answer,
    Hit,
    SystemConfig,
    broken,
    hits,
    load_entries,
    load_index,
    model_dir,
)
from lmpipeline.runtime import WEIGHTS, resolve_device

BACKEND = "cpt-sft"
# The references are short facts, so both modes ask for one sentence; they differ by the passages.
RAG_PROMPT = (
    "Answer the question in one short sentence, using the passages.\n\n{passages}\n\n"
    "Question: {question}"
)
CLOSED_BOOK_PROMPT = "Answer the question in one short sentence.\n\nQuestion: {question}"
PASSAGE = "Passage {n}: {text}"
RETRIEVER_DIR = "retriever"
BM25_DIR = "bm25"
QUERY_BATCH = 32


def rag_prompt(
    config: SystemConfig, question: str, hits: Sequence[Hit], max_words: int | None = None
) -> str:
    """The generator's prompt, each passage cut to its first `max_words` words if given."""
    assert config.prompt is not None and config.passage is not None
    passages = "\n\n".join(
        config.passage.format(n=n, text=" ".join(h.entry.text.split()[:max_words]))
        for n, h in enumerate(hits, start=1)
    )
    return config.prompt.format(passages=passages, question=question)


def fitted_prompt(
    config: SystemConfig,
    question: str,
    hits: Sequence[Hit],
    tokenizer: PreTrainedTokenizerBase,
    budget: int | None,
) -> str:
    """The prompt, with passages shortened (halving their words) until its chat rendering fits
    `budget` tokens: a generator with a short context (GPT-2: 1,024) still gets every passage.
    Where passages of one word each still do not fit, the question gives way last, from its end;
    a context too short for the prompt's own words is refused, never overrun."""
    max_words = max((len(h.entry.text.split()) for h in hits), default=0)
    while True:
        prompt = rag_prompt(config, question, hits, max_words)
        if budget is None:
            return prompt
        over = len(encode_turns(tokenizer, prompt_text(tokenizer, prompt), [prompt])) - budget
        if over <= 0:
            return prompt
        if max_words > 1:
            max_words //= 2
            continue
        words = question.split()
        if not words:
            raise SetupError(
                f"the generator's context leaves {budget} tokens for the prompt, fewer than its"
                " template takes: use a generator with a longer context or a lower max_new_tokens"
            )
        question = " ".join(words[: len(words) - over])  # a word is at least a token


def budget_of(model_config: PretrainedConfig, room: int) -> int | None:
    """Tokens a prompt may take: the generator's context less `room` for what follows it (None:
    no bound)."""
    context = getattr(model_config, "max_position_embeddings", None)
    return context - room if context else None


def room_after(config: SystemConfig, tokenizer: PreTrainedTokenizerBase, answer: int) -> int:
    """The tokens to keep after a prompt: an answer of `answer` tokens, or the refusal, whose
    likelihood is read right after the prompt, if it is longer."""
    refusal = len(response_ids(tokenizer, config.refusal)) if config.refusal else 0
    return max(answer, refusal)


class CptSftSystem:
    """Retriever, indexes and generator loaded from a rag directory; `ask` answers a question."""

    def __init__(self, path: Path, config: SystemConfig, device: torch.device) -> None:
        self.config = config
        generator = model_dir(path, config.generator, "generator")
        self.closed_book_dir = (
            model_dir(path, config.closed_book_generator, "closed_book_generator")
            if config.closed_book_generator
            else None
        )
        self.entries = load_entries(path)
        retriever = path / RETRIEVER_DIR
        if not (retriever / "config.json").is_file():
            raise broken(retriever, "holds no encoder")
        if not (path / BM25_DIR).is_dir():
            raise broken(path / BM25_DIR, "missing")
        self.tokenizer = AutoTokenizer.from_pretrained(retriever, trust_remote_code=False)
        self.encoder = AutoModel.from_pretrained(
            retriever, use_safetensors=True, trust_remote_code=False, **WEIGHTS
        )
        self.encoder.to(device).eval()
        self.index = load_index(path, len(self.entries), self.encoder.config.hidden_size)
        try:
            self.bm25 = bm25s.BM25.load(str(path / BM25_DIR), show_progress=False)
        except (OSError, ValueError) as err:
            raise broken(path / BM25_DIR, f"not a BM25 index ({err})") from None
        self.generator_tokenizer, _ = load_chat_tokenizer(generator)
        self.generator = load_causal_lm(generator, device).eval()
        self.reranker = None
        if config.reranker is not None:
            reranker = model_dir(path, config.reranker, "reranker")
            self.reranker = load_reranker(reranker, device)
        self.refusal_ids = (
            response_ids(self.generator_tokenizer, config.refusal) if config.refusal else None
        )

    @classmethod
    def load(cls, path: Path, config: SystemConfig, device: str = "auto") -> CptSftSystem:
        return cls(path, config, resolve_device(device))

    def first_stage(self, questions: Sequence[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, entry indices) of the configured retriever for each question."""
        kind = self.config.retriever
        if kind == "bm25":
            return bm25_search(self.bm25, questions, depth)
        vectors = embed(
            self.encoder, self.tokenizer, questions, self.config.max_length, QUERY_BATCH
        )
        dense = search(self.index, vectors, max(depth, CANDIDATES))
        if kind == "dense":
            return dense[0][:, :depth], dense[1][:, :depth]
        lexical = bm25_search(self.bm25, questions, max(depth, CANDIDATES))
        weight = self.config.fusion_weight
        return hybrid(
            dense[1], lexical[1], len(self.entries), depth, 0.5 if weight is None else weight
        )

    def rank(self, questions: Sequence[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, entry indices) of the system's retrieval for each question: the first
        stage's, or its top max(depth, rerank_candidates) reordered by the reranker (scores:
        the reranker's logits)."""
        if self.reranker is None:
            return self.first_stage(questions, depth)
        assert self.config.rerank_candidates and self.config.rerank_max_length
        _, ids = self.first_stage(questions, max(depth, self.config.rerank_candidates))
        texts = [e.text for e in self.entries]
        model, tokenizer = self.reranker
        scores, ids = rerank_rows(
            model, tokenizer, questions, ids, texts, self.config.rerank_max_length
        )
        return scores[:, :depth], ids[:, :depth]

    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        scores, ids = self.rank([question], k or self.config.top_k)
        return hits(self.entries, scores[0], ids[0])

    def closed_book(self, questions: Sequence[str], batch_size: int) -> list[str]:
        """The answers without passages, in the same prompt format otherwise, of the SFT model
        (`closed_book_generator` where the generator was taught to read passages: a model
        taught to say when passages lack an answer is no closed-book baseline)."""
        assert self.config.closed_book_prompt is not None
        prompts = [self.config.closed_book_prompt.format(question=q) for q in questions]
        model, tokenizer = self.generator, self.generator_tokenizer
        if self.closed_book_dir is not None:
            tokenizer, _ = load_chat_tokenizer(self.closed_book_dir)
            model = load_causal_lm(self.closed_book_dir, self.generator.device).eval()
        return generate(model, tokenizer, prompts, self.config.max_new_tokens, batch_size)

    def prompt_budget(self, answer: int | None = None) -> int | None:
        """Tokens the prompt may take: the generator's context less an answer's (`answer`
        tokens, by default the config's) or the refusal's."""
        room = room_after(
            self.config, self.generator_tokenizer, answer or self.config.max_new_tokens
        )
        return budget_of(self.generator.config, room)

    @staticmethod
    def prompt_budget_of(
        generator: Path, config: SystemConfig, tokenizer: PreTrainedTokenizerBase
    ) -> int | None:
        """`prompt_budget` of the generator in directory `generator`, without loading it."""
        model_config = AutoConfig.from_pretrained(generator, trust_remote_code=False)
        return budget_of(model_config, room_after(config, tokenizer, config.max_new_tokens))

    def prefill(self, batch: BatchEncoding) -> tuple[list[bool], Prefilled | None]:
        """Whether to refuse each prompt of a left-padded batch (its refusal's log-likelihood
        above the threshold), and the prefill that decided it (None: the generator was never
        taught to refuse, and never does)."""
        if self.refusal_ids is None:
            return [False] * len(batch["input_ids"]), None
        read = prefill(self.generator, batch, self.refusal_ids)
        threshold = self.config.refusal_threshold
        return [threshold is not None and bool(lp > threshold) for lp in read.logprobs], read

    def processors(self, width: int) -> LogitsProcessorList | None:
        """What keeps an answer from being the refusal, for prompts padded to `width` tokens."""
        if self.refusal_ids is None:
            return None
        return LogitsProcessorList([NoRefusal(self.refusal_ids[:2], width)])

    def read(self, prompts: Sequence[str]) -> list[tuple[str, float | None]]:
        """Each prompt's output and the reader's log-likelihood of its refusal (None: never
        taught): the refusal where it passes the threshold, else the best answer that is not
        the refusal, generated from the prefill's cache."""
        batch = left_padded(self.generator_tokenizer, prompts)
        refused, read = self.prefill(batch)
        kept = [i for i, no in enumerate(refused) if not no]
        answers: dict[int, str] = {}
        if kept:
            cache = read.cache if read else None
            if cache is not None and len(kept) < len(refused):
                cache.batch_select_indices(torch.tensor(kept))
            rows = BatchEncoding({k: v[kept] for k, v in batch.items()})
            width = batch["input_ids"].shape[1]
            texts = greedy(
                self.generator,
                self.generator_tokenizer,
                rows,
                self.config.max_new_tokens,
                self.processors(width),
                cache,
            )
            answers = dict(zip(kept, texts, strict=True))
        refusal = self.config.refusal or ""
        logprobs = [None] * len(prompts) if read is None else [float(lp) for lp in read.logprobs]
        return [(refusal if no else answers[i], logprobs[i]) for i, no in enumerate(refused)]

    def ask(self, question: str, k: int | None = None) -> Answer:
        return self.answers([question], 1, k)[0]

    def ask_many(self, questions: Sequence[str], batch_size: int) -> list[Answer]:
        return self.answers(questions, batch_size, None)

    def answers(self, questions: Sequence[str], batch_size: int, k: int | None) -> list[Answer]:
        """Retrieve for every question at once, decide which to refuse, then generate
        `batch_size` answers at a time (left-padded, greedy: the answers `ask` gives one by
        one). Prompts of similar length go together, so that a batch pads little; the answers
        come back in the questions' order."""
        scores, ids = self.rank(questions, k or self.config.top_k)
        found = [hits(self.entries, s, i) for s, i in zip(scores, ids, strict=True)]
        budget, tokenizer = self.prompt_budget(), self.generator_tokenizer
        prompts = [
            fitted_prompt(self.config, q, f, tokenizer, budget)
            for q, f in zip(questions, found, strict=True)
        ]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs = {}
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            outputs.update(zip(rows, self.read([prompts[i] for i in rows]), strict=True))
        return [
            Answer(q, outputs[i][0], f, outputs[i][1])
            for i, (q, f) in enumerate(zip(questions, found, strict=True))
        ]
