"""What the server reads and writes, in OpenAI's shapes: the requests, checked by pydantic
strictly (a string where a number belongs is refused, not converted; a whole number is a float),
the completions and their stream chunks, and errors as
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from lmpipeline.rag.ask import MAX_TOP_K
from lmpipeline.rag.system import Hit

OWNER = "lm-pipeline"


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send `name` and the like

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatCompletionRequest(BaseModel):
    # OpenAI's other fields (top_p, stop, user, ...) are accepted and left unused
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # the system's max_new_tokens if not given
    # 0 is greedy, as `rag-ask` and the metrics answer; OpenAI's own default is 1
    temperature: StrictFloat = Field(default=0.0, ge=0, le=2, allow_inf_nan=False)
    stream: StrictBool = False
    n: Literal[1] = 1  # one answer per request


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    k: StrictInt | None = Field(default=None, ge=1, le=MAX_TOP_K)  # the system's top_k if None


def error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def passages(hits: list[Hit]) -> list[dict[str, Any]]:
    return [{"id": h.entry.id, "score": h.score, "text": h.entry.text} for h in hits]


def model_list(names: tuple[str, ...], created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": OWNER} for name in names
        ],
    }


class Completion:
    """The fields every response to one chat request shares: its id, time and model."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(
        self, text: str, finish: str, usage: dict[str, int], hits: list[Hit] | None
    ) -> dict[str, Any]:
        """The `chat.completion` of a request without `stream`; `passages` beside the message
        for the `rag` model."""
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
        body = {**self.head("chat.completion"), "choices": [choice], "usage": usage}
        return body if hits is None else {**body, "passages": passages(hits)}

    def chunk(self, delta: dict[str, str], finish: str | None = None, **extra: Any) -> str:
        """One server-sent event of a stream: a `chat.completion.chunk`."""
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return event({**self.head("chat.completion.chunk"), "choices": [choice], **extra})


def event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


DONE = "data: [DONE]\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
