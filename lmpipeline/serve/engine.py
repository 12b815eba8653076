"""Answers for the server: a loaded RAG system's generator over a chat, closed-book (`sft`) or with
the passages it retrieves for the last user message (`rag`), streamed as it is generated where the
backend can.

One lock serializes every use of the system: a `Generation` holds it from the moment it is opened
(retrieval, the prompt) until it is closed (the last token), so that no two requests ever share
the model, its tokenizers or their settings at the same time (`chat.generate` flips a tokenizer's
padding side, for one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import (
    BatchEncoding,
    Cache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from lmpipeline.chat import (
    TemplateError,
    encode_turns,
    load_causal_lm,
    load_chat_tokenizer,
    prompt_ids,
    prompt_text,
)
from lmpipeline.conversations import Message
from lmpipeline.data import visible
from lmpipeline.errors import StageError
from lmpipeline.rag import cpt_sft, rag_sequence
from lmpipeline.rag.system import Hit, System, check_question

MODELS = ("rag", "sft")  # with the passages it retrieves; closed-book


class RequestError(Exception):
    """A request the system cannot answer as asked; `param` names the field to change."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Timeout(Exception):
    """The system was busy past the request's deadline."""


@dataclass(frozen=True)
class ChatRequest:
    model: str  # one of MODELS
    messages: list[Message]
    max_tokens: int
    temperature: float  # 0: greedy
    deadline: float  # time.monotonic() by which the answer must be done


def question_of(messages: list[Message]) -> str:
    """The last message's text: what a user asks now, and what `rag` retrieves passages for."""
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", "messages")
    try:
        return check_question(messages[-1]["content"])
    except StageError as err:
        raise RequestError(str(err), "messages") from None


@dataclass
class Generation:
    """One answer being generated. Iterate for its text as it comes; `close` (always) stops it
    where it is and frees the system for the next request."""

    passages: list[Hit]
    prompt_tokens: int
    release: Callable[[], None]
    completion_tokens: int = 0
    interrupted: str | None = None  # "timeout", "shutdown" or "cancelled": cut short
    closed: bool = field(default=False, init=False)

    def pieces(self) -> Iterator[str]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        """The answer's text in pieces, without the whitespace a decoder leaves before it."""
        started = False
        for piece in self.pieces():
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield piece

    def text(self) -> str:
        return "".join(self).rstrip()

    def finish_reason(self, max_tokens: int) -> str:
        return "length" if self.completion_tokens >= max_tokens else "stop"

    def stop(self) -> None:
        """Stop generating at the next token (nothing to do for an answer already whole)."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stop()
            self.release()


class Interrupt(StoppingCriteria):
    """Ends generation at the next token once `should_stop()` says so."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        stop = self.should_stop()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class StreamedGeneration(Generation):
    """`model.generate` in a worker thread, its text read from a TextIteratorStreamer."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        request: ChatRequest,
        passages: list[Hit],
        release: Callable[[], None],
        stopping: threading.Event,
        processors: LogitsProcessorList | None = None,
        cache: Cache | None = None,
    ) -> None:
        super().__init__(passages=passages, prompt_tokens=len(ids), release=release)
        self.stopping, self.deadline = stopping, request.deadline
        self.processors, self.cache = processors, cache  # the prompt read already, if it was
        self.cancelled = threading.Event()  # the request is over (its client left)
        self.error: Exception | None = None
        self.streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.thread = threading.Thread(
            target=self.generate, args=(model, tokenizer, ids, request), daemon=True
        )
        self.thread.start()

    def should_stop(self) -> bool:
        """Asked after each token: whether the answer must end here, and why (`interrupted`)."""
        if self.interrupted is None:
            if self.cancelled.is_set():
                self.interrupted = "cancelled"
            elif self.stopping.is_set():
                self.interrupted = "shutdown"
            elif time.monotonic() > self.deadline:
                self.interrupted = "timeout"
        return self.interrupted is not None

    @torch.no_grad()
    def generate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        request: ChatRequest,
    ) -> None:
        sample = request.temperature > 0
        try:
            out = model.generate(
                input_ids=torch.tensor([ids], device=model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                max_new_tokens=request.max_tokens,
                do_sample=sample,
                temperature=request.temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                logits_processor=self.processors,
                cache=self.cache,
                streamer=self.streamer,
                stopping_criteria=StoppingCriteriaList([Interrupt(self.should_stop)]),
            )
            self.completion_tokens = out.shape[1] - len(ids)
        except Exception as err:  # re-raised by the reader, in the request's thread
            self.error = err
            self.streamer.end()  # so that the reader does not wait for text that never comes

    def pieces(self) -> Iterator[str]:
        yield from self.streamer
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.cancelled.set()
        self.thread.join()


@dataclass
class WholeAnswer(Generation):
    """An answer generated in one piece, by a backend that cannot stream."""

    answer: str = ""

    def pieces(self) -> Iterator[str]:
        yield self.answer


class Engine:
    """A loaded system behind one lock. `stopping` is set when the server shuts down: answers
    being generated end at their next token."""

    def __init__(self, system: System, stopping: threading.Event) -> None:
        self.system = system
        self.stopping = stopping
        self.lock = threading.Lock()

    @property
    def max_tokens(self) -> int:
        """The answer length a request gets by default: the system's own."""
        return self.system.config.max_new_tokens

    def acquire(self, deadline: float) -> None:
        if not self.lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise Timeout

    def retrieve(self, query: str, k: int | None, deadline: float) -> list[Hit]:
        if not visible(query):
            raise RequestError("the query is empty", "query")
        self.acquire(deadline)
        try:
            return self.system.retrieve(query, k)
        finally:
            self.lock.release()

    def open(self, request: ChatRequest) -> Generation:
        """The answer to `request`, started; it holds the lock until it is closed (a
        threading.Lock may be released by another thread than the one that took it)."""
        question = question_of(request.messages)
        self.acquire(request.deadline)
        try:
            return self.start(request, question)
        except BaseException:
            self.lock.release()
            raise

    def start(self, request: ChatRequest, question: str) -> Generation:
        raise NotImplementedError


def context_of(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class CptSftEngine(Engine):
    """The SFT generator streams its answer: over the chat in its template (`sft`), or over the
    reader prompt with the retrieved passages (`rag`), as `rag-ask` prompts it."""

    system: cpt_sft.CptSftSystem

    def __init__(self, system: cpt_sft.CptSftSystem, stopping: threading.Event) -> None:
        super().__init__(system, stopping)
        self.sft: tuple[PreTrainedModel, PreTrainedTokenizerBase] = (
            system.generator,
            system.generator_tokenizer,
        )
        if system.closed_book_dir is not None:  # the generator was taught to read passages
            model = load_causal_lm(system.closed_book_dir, system.generator.device).eval()
            self.sft = (model, load_chat_tokenizer(system.closed_book_dir)[0])

    def start(self, request: ChatRequest, question: str) -> Generation:
        processors, cache = None, None
        if request.model == "rag":
            model, tokenizer = self.system.generator, self.system.generator_tokenizer
            passages = self.system.retrieve(question)
            ids = self.reader_prompt(question, passages, request.max_tokens)
            # Refused or not is decided before the first token, so a stream is never retracted;
            # the prompt read to decide it is not read again to answer.
            batch = BatchEncoding(
                {
                    "input_ids": torch.tensor([ids]),
                    "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                }
            )
            (refused,), read = self.system.prefill(batch)
            if refused:
                refusal = self.system.config.refusal or ""
                return WholeAnswer(
                    passages=passages,
                    prompt_tokens=len(ids),
                    completion_tokens=len(tokenizer(refusal)["input_ids"]),
                    release=self.lock.release,
                    answer=refusal,
                )
            processors = self.system.processors(len(ids))
            cache = read.cache if read else None
        else:
            model, tokenizer = self.sft
            passages, ids = [], self.chat_prompt(request.messages)
            context = context_of(model)
            if context is not None and len(ids) + request.max_tokens > context:
                raise RequestError(
                    f"the conversation takes {len(ids)} tokens and the answer up to"
                    f" {request.max_tokens}: more than the model's context of {context}",
                    "messages",
                )
        return StreamedGeneration(
            model,
            tokenizer,
            ids,
            request,
            passages,
            self.lock.release,
            self.stopping,
            processors,
            cache,
        )

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """The conversation's token ids exactly as SFT trained on them (`chat.prompt_ids`)."""
        _, tokenizer = self.sft
        try:
            return prompt_ids(tokenizer, messages)
        except TemplateError as err:
            raise RequestError(str(err), "messages") from None

    def reader_prompt(self, question: str, passages: list[Hit], max_tokens: int) -> list[int]:
        """The system's prompt with passages, shortened to leave `max_tokens` for the answer
        (or the refusal, whose likelihood is read after it, if longer)."""
        tokenizer, budget = self.system.generator_tokenizer, self.system.prompt_budget(max_tokens)
        try:
            prompt = cpt_sft.fitted_prompt(
                self.system.config, question, passages, tokenizer, budget
            )
        except StageError as err:
            raise RequestError(str(err), "max_tokens") from None
        return encode_turns(tokenizer, prompt_text(tokenizer, prompt), [prompt])


class RagSequenceEngine(Engine):
    """transformers' RAG-sequence decodes an answer per document and keeps the likeliest, so its
    answer comes whole, greedy and at most the system's `max_new_tokens` long, as `rag-ask`
    gives it; `sft` is its BART generator on the last question alone."""

    system: rag_sequence.RagSequenceSystem

    def start(self, request: ChatRequest, question: str) -> Generation:
        if request.model == "rag":
            answer = self.system.ask(question)
            text, passages = answer.text, answer.passages
        else:
            text, passages = self.system.closed_book([question], 1)[0], []
        tokenizer = self.system.tokenizer
        return WholeAnswer(
            passages=passages,
            prompt_tokens=len(tokenizer.question_encoder(question)["input_ids"]),
            completion_tokens=len(tokenizer.generator(text)["input_ids"]),
            release=self.lock.release,
            answer=text,
        )


ENGINES: dict[str, Callable[..., Engine]] = {
    cpt_sft.BACKEND: CptSftEngine,
    rag_sequence.BACKEND: RagSequenceEngine,
}


def engine_for(system: System, stopping: threading.Event) -> Engine:
    return ENGINES[system.config.backend](system, stopping)
