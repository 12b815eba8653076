"""Chat formatting and greedy generation with a causal LM: what SFT trains on and what the
default RAG backend answers with.

The tokenizer's chat template is used where it has one (SmolLM2's ChatML); a model without one
(GPT-2) gets the original spec's `Human: {prompt}\\nAssistant: {response}<eos>` format (a system
prompt, where a conversation has one, on the line before), which
the SFT stage saves with the model as its chat template, so that generation everywhere
(`pipeline("text-generation")` included) uses the format it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    Cache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmpipeline.conversations import Message, conversation
from lmpipeline.errors import StageError
from lmpipeline.runtime import WEIGHTS

HUMAN_ASSISTANT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give the tokenizer the Human/Assistant template if it has none; say which one is used."""
    if tokenizer.chat_template:
        return "tokenizer chat template"
    tokenizer.chat_template = HUMAN_ASSISTANT_TEMPLATE
    return "Human/Assistant format"


def load_chat_tokenizer(path: Path) -> tuple[PreTrainedTokenizerBase, str]:
    """A causal LM's tokenizer with a chat template and a pad token (end of text where it has
    none: padding is masked, never learned), and which template it uses."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    template = ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, template


def load_causal_lm(path: Path, device: torch.device) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, **WEIGHTS
    ).to(device)


def encode_turns(
    tokenizer: PreTrainedTokenizerBase, rendered: str, contents: Sequence[str]
) -> list[int]:
    """Token ids of a chat rendered with its template, in which `contents` (the messages' texts,
    in order) are data: the template's own markers become control tokens, while a marker that a
    prompt, response or passage holds as text (`<|im_start|>assistant` in a document about chat
    templates) is split into ordinary tokens, so data can never forge a turn."""
    ids: list[int] = []
    at = 0
    for content in contents:
        start = rendered.find(content, at) if content else -1
        if start < 0:  # a template that rewrote the content: nothing of it is kept apart
            continue
        ids += tokenizer(rendered[at:start], add_special_tokens=False)["input_ids"]
        ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        at = start + len(content)
    return ids + tokenizer(rendered[at:], add_special_tokens=False)["input_ids"]


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model sees it, up to where the answer starts."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


class TemplateError(StageError):
    """The chat template cannot render conversations the way training needs."""


def segments(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool
) -> Iterator[tuple[list[int], bool]]:
    """The token ids of a conversation rendered with the chat template, piece by piece, each
    with whether it is an assistant turn: its text as the template renders it after the
    generation prompt, up to where the next turn starts (the end-of-turn marker included), as
    TRL's completion-only loss reads a prompt/completion pair. With `add_generation_prompt`, the
    last piece is the generation prompt after the last message.

    Each assistant turn is cut out by rendering the conversation up to it twice, with and without
    it, so the template, not a guess at its markers, says where the turn is. That needs a template
    under which a conversation's rendering extends the rendering of its first turns (ChatML, Llama
    3, Gemma, Mistral do); one that does not (that rewrites earlier turns) is an error."""
    done, start = "", 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise TemplateError(
                f"the chat template does not render turn {i + 1} after the turns before it"
                " (it rewrites earlier turns, or puts the answer elsewhere): SFT needs a template"
                " whose rendering of a conversation extends that of its first turns"
            )
        contents = [m["content"] for m in messages[start:i]]
        yield encode_turns(tokenizer, head[len(done) :], contents), False
        yield encode_turns(tokenizer, full[len(head) :], [message["content"]]), True
        done, start = full, i + 1
    if add_generation_prompt or start < len(messages):
        rest = render(tokenizer, messages, add_generation_prompt)
        if not rest.startswith(done):
            raise TemplateError(
                "the chat template does not render the last turns after the ones before them"
            )
        contents = [m["content"] for m in messages[start:]]
        yield encode_turns(tokenizer, rest[len(done) :], contents), False


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """The token ids a model reads before it answers `messages`: exactly the ids it was trained
    on for that conversation start (the same pieces, `segments`), then the generation prompt."""
    return [t for ids, _ in segments(tokenizer, messages, add_generation_prompt=True) for t in ids]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 but on assistant turns: the loss covers what the model says only
    truncated: bool


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], max_length: int
) -> Example | None:
    """Tokenize one conversation, the labels on its assistant turns only (`segments`), cut to
    `max_length` tokens; None when the cut leaves no assistant token to learn."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, learned in segments(tokenizer, messages, add_generation_prompt=False):
        input_ids += ids
        labels += ids if learned else [-100] * len(ids)
    if all(label == -100 for label in labels[:max_length]):
        return None
    return Example(input_ids[:max_length], labels[:max_length], len(input_ids) > max_length)


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> Example | None:
    """Tokenize one prompt/response pair (`encode_chat`)."""
    return encode_chat(
        tokenizer, conversation({"prompt": prompt, "response": response}), max_length
    )


def left_padded(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | Sequence[Message]]
) -> BatchEncoding:
    """The prompts' chat renderings as one batch, padded on the left: where generation goes on.
    A prompt is a user's message, or a conversation that ends with one."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        ids = [prompt_ids(tokenizer, _messages(p)) for p in prompts]
        return tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


def _messages(prompt: str | Sequence[Message]) -> Sequence[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@torch.no_grad()
def greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: BatchEncoding,
    max_new_tokens: int,
    processors: LogitsProcessorList | None = None,
    cache: Cache | None = None,
) -> list[str]:
    """Greedy answers to a left-padded batch of prompts; `cache` may hold the keys and values of
    all but their last token, computed already (they are not computed again)."""
    model.eval()
    width = batch["input_ids"].shape[1]
    out = model.generate(
        **batch.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=processors,
        cache=cache,
    )
    return [a.strip() for a in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Sequence[Message]],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to `prompts`, `batch_size` at a time, left-padded."""
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = left_padded(tokenizer, prompts[i : i + batch_size])
        answers += greedy(model, tokenizer, batch, max_new_tokens)
    return answers
