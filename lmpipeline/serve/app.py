"""The server's HTTP face over one `Engine`: OpenAI's chat completions (streamed as server-sent
events or whole), retrieval, the models, the run's key metrics, and the playground page.

    POST /v1/chat/completions   {"model": "rag"|"sft", "messages": [...], "max_tokens", ...}
    POST /v1/retrieve           {"query": "...", "k": 3}
    GET  /v1/models, /v1/metrics, /health, / (the playground)

Every refusal is a 4xx JSON body in OpenAI's error shape, and the server goes on serving.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyio import CancelScope
from anyio.to_thread import run_sync
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmpipeline.report import Row
from lmpipeline.serve.engine import MODELS, ChatRequest, Engine, Generation, RequestError, Timeout
from lmpipeline.serve.schema import (
    DONE,
    ChatCompletionRequest,
    Completion,
    RetrieveRequest,
    error,
    event,
    model_list,
    passages,
    usage,
)

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024  # bytes: a long conversation fits; a pasted book does not


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None  # checked on every route but /health and the page
    timeout: float = 60.0  # seconds a request may wait for the model and use it
    max_tokens: int = 512  # the longest answer a request may ask for
    max_body: int = MAX_BODY
    metrics: tuple[Row, ...] = ()  # the run's key metrics, as `make repro` prints them


class ApiError(Exception):
    """A refused request: its status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.body = status, error(message, kind, param, code)


def refusal(status: int, message: str, **fields: Any) -> JSONResponse:
    return JSONResponse(ApiError(status, message, **fields).body, status_code=status)


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413, whether it declares its length or
    not. The body is read (and dropped) to its end first: a reply sent while the client is still
    sending would reach it as a reset connection, not as the 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            size += len(message.get("body", b""))
            if size <= self.limit:
                parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        if size > self.limit:
            text = f"the request body is {size} bytes; the most this server reads is {self.limit}"
            await refusal(413, text, code="request_too_large")(scope, receive, send)
            return
        await self.app(scope, replay(b"".join(parts), receive), send)


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that first gives the body already read, then what the client sends next (a
    disconnect, which a streamed answer listens for)."""
    given = False

    async def receive_again() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


def key_check(expected: str | None) -> Callable[[str | None], None]:
    def check(authorization: str | None = Header(default=None)) -> None:
        if expected is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        # compare_digest: the time a wrong key takes says nothing about the right one
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.encode(), expected.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
            )

    return check


def validation_refusal(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400: the first problem, and the field it is in."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return refusal(400, f"the body is not valid JSON ({first['ctx']['error']})")
    where = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(where) or None
    return refusal(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value")


def http_refusal(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no such route, a method it does not take) in the same shape."""
    assert isinstance(exc, HTTPException)
    body = error(str(exc.detail), "invalid_request_error")
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def api_refusal(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body, status_code=exc.status)


def server_failure(_: Request, exc: Exception) -> JSONResponse:
    """A bug: the response says which exception, the server's log has the traceback."""
    return refusal(500, f"the server failed: {type(exc).__name__}", kind="server_error")


HANDLERS: dict[type[Exception], Callable[[Request, Exception], JSONResponse]] = {
    ApiError: api_refusal,
    RequestValidationError: validation_refusal,
    HTTPException: http_refusal,
    Exception: server_failure,
}


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="lm-pipeline", docs_url=None, redoc_url=None, openapi_url=None)
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.add_middleware(BodyLimit, limit=settings.max_body)
    app.include_router(api(engine, settings))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health() -> dict[str, Any]:
        config = engine.system.config
        return {
            "status": "ok",
            "backend": config.backend,
            "retriever": config.retriever,
            "models": list(MODELS),
            "api_key": settings.api_key is not None,
        }

    return app


def api(engine: Engine, settings: Settings) -> APIRouter:
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(key_check(settings.api_key))])
    created = int(time.time())

    @v1.get("/models")
    def models() -> dict[str, Any]:
        return model_list(MODELS, created)

    @v1.get("/metrics")
    def metrics() -> dict[str, Any]:
        rows = [{"stage": s, "metric": m, "value": v} for s, m, v in settings.metrics]
        return {"object": "list", "data": rows}

    @v1.post("/retrieve")
    async def retrieve(body: RetrieveRequest) -> dict[str, Any]:
        deadline = time.monotonic() + settings.timeout
        hits = await answering(run_sync(engine.retrieve, body.query, body.k, deadline))
        return {"object": "list", "query": body.query, "data": passages(hits)}

    @v1.post("/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        request = chat_request(body, engine, settings)
        generation = await answering(run_sync(engine.open, request))
        completion = Completion(body.model)
        if body.stream:
            chunks = stream(generation, completion, request, settings)
            return StreamingResponse(
                chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            text = await run_sync(generation.text)
        finally:
            await run_sync(generation.close)
        if generation.interrupted is not None:
            raise interruption(generation.interrupted, settings)
        tokens = usage(generation.prompt_tokens, generation.completion_tokens)
        hits = generation.passages if body.model == "rag" else None
        return JSONResponse(
            completion.whole(text, generation.finish_reason(request.max_tokens), tokens, hits)
        )

    return v1


async def answering(work: Awaitable[Any]) -> Any:
    """`work` on the engine, its refusals as API errors."""
    try:
        return await work
    except RequestError as err:
        raise ApiError(400, str(err), param=err.param) from None
    except Timeout:
        raise ApiError(
            504, "the model stayed busy past this request's timeout", code="timeout", kind="timeout"
        ) from None


def interruption(reason: str, settings: Settings) -> ApiError:
    if reason == "timeout":
        text = f"the answer took longer than the server's timeout of {settings.timeout:g} s"
        return ApiError(504, text, code="timeout", kind="timeout")
    return ApiError(503, "the server is shutting down", code=reason, kind="server_error")


def chat_request(body: ChatCompletionRequest, engine: Engine, settings: Settings) -> ChatRequest:
    if body.model not in MODELS:
        known = " or ".join(repr(m) for m in MODELS)
        raise ApiError(
            404,
            f"the model {body.model!r} does not exist here: use {known}",
            param="model",
            code="model_not_found",
        )
    max_tokens = engine.max_tokens if body.max_tokens is None else body.max_tokens
    if not 1 <= max_tokens <= settings.max_tokens:
        raise ApiError(
            400,
            f"max_tokens must be between 1 and {settings.max_tokens}, got {max_tokens}",
            param="max_tokens",
            code="invalid_value",
        )
    return ChatRequest(
        model=body.model,
        messages=[m.model_dump(include={"role", "content"}) for m in body.messages],
        max_tokens=max_tokens,
        temperature=body.temperature,
        deadline=time.monotonic() + settings.timeout,
    )


async def stream(
    generation: Generation, completion: Completion, request: ChatRequest, settings: Settings
) -> AsyncIterator[str]:
    """The answer as OpenAI's chunks: the role (with the passages, for `rag`), the text as it
    comes, the finish reason with the usage, then [DONE]. An answer cut short (timeout,
    shutdown) ends with an error event instead of the finish, then [DONE]."""
    try:
        extra = {"passages": passages(generation.passages)} if request.model == "rag" else {}
        yield completion.chunk({"role": "assistant", "content": ""}, **extra)
        async for piece in iterate_in_threadpool(iter(generation)):
            yield completion.chunk({"content": piece})
        if generation.interrupted is not None:
            yield event(interruption(generation.interrupted, settings).body)
        else:
            finish = generation.finish_reason(request.max_tokens)
            tokens = usage(generation.prompt_tokens, generation.completion_tokens)
            yield completion.chunk({}, finish, usage=tokens)
        yield DONE
    finally:
        # Also when the client left mid-answer: the model stops, and the next request gets it.
        with CancelScope(shield=True):
            await run_sync(generation.close)
