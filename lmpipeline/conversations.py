"""The shapes SFT data comes in, and the one conversation each record becomes.

Four shapes are read, one per file (the first record decides; a record of another shape is an
error at its line):

- `prompt`/`response`, this project's own: `{"prompt": ..., "response": ...}`;
- OpenAI/TRL conversations: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}`;
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}`;
- Alpaca: `{"instruction": ..., "input": ..., "output": ...}` (`input` and `system` optional).

A prompt/response record stays one in the canonical file (so that data in that shape gives the
same bytes as before the other shapes existed); every other record is written as OpenAI messages.
A conversation is an optional system turn, then user and assistant turns that alternate, starting
with the user and ending with the assistant: what every chat template accepts (some, such as
Llama 2's and Mistral's, raise on anything else), and the loss needs the assistant's last word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmpipeline.data import visible
from lmpipeline.params import Bounds, SftBounds

Message = dict[str, str]  # {"role": ..., "content": ...}
ROLES = ("system", "user", "assistant")
# ShareGPT's speakers, as FastChat and LLaMA-Factory write them; tool turns are not trained here.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class Shape:
    name: str  # what a person calls it, in messages
    keys: tuple[str, ...]  # the record's keys that the shape reads (the others are extra)


PAIR = Shape("prompt/response", ("prompt", "response"))
MESSAGES = Shape("OpenAI messages", ("messages",))
SHAREGPT = Shape("ShareGPT", ("conversations",))
ALPACA = Shape("Alpaca", ("instruction", "input", "output", "system"))
ALPACA_KEYS = {
    "system": "'system'",
    "user": "'instruction' (with 'input')",
    "assistant": "'output'",
}


def shape_of(record: dict[str, Any]) -> Shape:
    """The shape a record is in, by the keys it has. A record with none of the shapes' keys is
    taken as prompt/response, so that its error says which key is missing."""
    if "messages" in record:
        return MESSAGES
    if "conversations" in record:
        return SHAREGPT
    if "instruction" in record or "output" in record:
        return ALPACA
    return PAIR


class NotAConversation(ValueError):
    """What makes a record no conversation, as one message for its line."""


def messages_of(record: dict[str, Any], shape: Shape, bounds: SftBounds) -> list[Message]:
    """The conversation a record of `shape` (not prompt/response) holds, checked: roles known,
    turns alternating, every content a string with something visible within the bounds."""
    if shape is ALPACA:
        turns = _alpaca(record)
    else:
        key = shape.keys[0]
        items = record[key]
        if not isinstance(items, list) or not items:
            raise NotAConversation(f"'{key}' must be a non-empty list of turns")
        turns = [_turn(item, f"{key}[{i}]", shape) for i, item in enumerate(items)]
    _check_order([m["role"] for m in turns], shape)
    for i, m in enumerate(turns):
        what = ALPACA_KEYS[m["role"]] if shape is ALPACA else f"turn {i + 1} ({m['role']})"
        if not visible(m["content"]):
            raise NotAConversation(
                f"{what} is empty once whitespace and invisible characters are removed"
            )
        # System and user turns are held to the prompt's bounds, assistant turns to the response's.
        name = "response" if m["role"] == "assistant" else "prompt"
        _check_length(what, m["content"], getattr(bounds, name), f"validate.sft.{name}")
    return turns


def _check_length(what: str, text: str, bounds: Bounds, key: str) -> None:
    n = len(text.strip())
    if not bounds.min_chars <= n <= bounds.max_chars:
        raise NotAConversation(
            f"{what} has {n} characters once stripped, outside"
            f" [{bounds.min_chars}, {bounds.max_chars}] ({key} in params.yaml)"
        )


def _turn(item: Any, where: str, shape: Shape) -> Message:
    role_key, content_key = ("from", "value") if shape is SHAREGPT else ("role", "content")
    if not isinstance(item, dict):
        raise NotAConversation(f"{where} must be an object, got {type(item).__name__}")
    for key in (role_key, content_key):
        if key not in item:
            raise NotAConversation(f"{where} has no '{key}'")
    role, content = item[role_key], item[content_key]
    known = SHAREGPT_ROLES if shape is SHAREGPT else dict(zip(ROLES, ROLES, strict=True))
    if role not in known:
        raise NotAConversation(
            f"{where}: unknown {role_key} {role!r}; one of {', '.join(map(repr, known))}"
        )
    if not isinstance(content, str):
        raise NotAConversation(
            f"{where}: '{content_key}' must be a string, got {type(content).__name__}"
        )
    return {"role": known[role], "content": content}


def _alpaca(record: dict[str, Any]) -> list[Message]:
    for key in ALPACA.keys:
        value = record.get(key)
        if key in ("instruction", "output") and value is None:
            raise NotAConversation(f"'{key}' is null" if key in record else f"missing key '{key}'")
        if value is not None and not isinstance(value, str):
            raise NotAConversation(f"'{key}' must be a string, got {type(value).__name__}")
    # The instruction, then its input a paragraph below: the user turn most converters make.
    user = "\n\n".join(t for t in (record["instruction"], record.get("input")) if t and t.strip())
    system = record.get("system")
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    answer = record["output"]
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _check_order(roles: Sequence[str], shape: Shape) -> None:
    """An optional system turn first, then user and assistant alternating, the assistant last."""
    body = roles[1:] if roles and roles[0] == "system" else roles
    names = {v: k for k, v in SHAREGPT_ROLES.items()} if shape is SHAREGPT else None
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            found = names[role] if names else role
            want = names[expected] if names else expected
            where = i + 1 + (len(roles) - len(body))
            raise NotAConversation(
                f"turn {where} is {found!r} where the conversation needs {want!r}: after an"
                " optional system turn, user and assistant turns alternate, user first"
            )
    if not body or body[-1] != "assistant":
        raise NotAConversation(
            "the conversation does not end with an assistant turn: nothing to learn from its end"
        )


def canonical(record: dict[str, Any], shape: Shape, turns: list[Message] | None) -> dict[str, Any]:
    """What the validated file holds for a record: prompt/response as it is, any other shape as
    OpenAI messages."""
    if shape is PAIR:
        return {"prompt": record.get("prompt"), "response": record.get("response")}
    return {"messages": turns}


def conversation(record: dict[str, Any]) -> list[Message]:
    """The conversation of a canonical record (`canonical`)."""
    if "messages" in record:
        return record["messages"]
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]


def context_and_answer(record: dict[str, Any]) -> tuple[list[Message], str]:
    """A canonical record's conversation up to its last assistant turn, and that turn: what the
    held-out answers are generated from and scored against."""
    turns = conversation(record)
    return turns[:-1], turns[-1]["content"]
