"""Chat formatting and greedy generation with a causal LM: what SFT trains on and what the
default RAG backend answers with.

The tokenizer's chat template is used where it has one (SmolLM2's ChatML); a model without one
(GPT-2) gets the original spec's `Human: {prompt}\\nAssistant: {response}<eos>` format, which
the SFT stage saves with the model as its chat template, so that generation everywhere
(`pipeline("text-generation")` included) uses the format it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
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

from lmpipeline.runtime import WEIGHTS

HUMAN_ASSISTANT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n' }}"
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


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss covers the response only
    truncated: bool


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> Example | None:
    """Tokenize one pair; None when truncation would leave no response token to learn."""
    head = prompt_text(tokenizer, prompt)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(head):
        raise ValueError(
            "the chat template renders the answer somewhere other than after the prompt"
        )
    prompt_ids = encode_turns(tokenizer, head, [prompt])
    response_ids = encode_turns(tokenizer, full[len(head) :], [response])
    input_ids = (prompt_ids + response_ids)[:max_length]
    if len(input_ids) <= len(prompt_ids):
        return None
    labels = [-100] * len(prompt_ids) + response_ids
    return Example(input_ids, labels[:max_length], len(prompt_ids) + len(response_ids) > max_length)


def left_padded(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> BatchEncoding:
    """The prompts' chat renderings as one batch, padded on the left: where generation goes on."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        ids = [encode_turns(tokenizer, prompt_text(tokenizer, p), [p]) for p in prompts]
        return tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


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
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to `prompts`, `batch_size` at a time, left-padded."""
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = left_padded(tokenizer, prompts[i : i + batch_size])
        answers += greedy(model, tokenizer, batch, max_new_tokens)
    return answers
