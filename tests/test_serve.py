"""The server (`rag-serve`) over real HTTP: uvicorn on a free local port, serving a tiny system
(`lmpipeline.testing.tiny_system`), asked with httpx, the official `openai` client and a headless
browser; its refusals, its timeout, its shutdown, a little load."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from openai import APIError, OpenAI
from transformers import AutoTokenizer, DPRContextEncoder

from lmpipeline.chat import encode_chat
from lmpipeline.rag import ask, rag_sequence
from lmpipeline.rag.index import build_index, embed
from lmpipeline.rag.knowledge import Entry
from lmpipeline.rag.system import System, SystemConfig
from lmpipeline.report import metric_rows
from lmpipeline.serve import cli
from lmpipeline.serve.app import Settings, create_app
from lmpipeline.serve.engine import Engine, engine_for
from lmpipeline.testing import (
    CORPUS,
    TINY_SYSTEM,
    ask_in_playground,
    chromium,
    missing_browser,
    tiny_system,
)

ROOT = Path(__file__).resolve().parents[1]
KEY = "s3cret-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "what does the retriever find?"
MESSAGES = [{"role": "user", "content": QUESTION}]
# Bounds small enough to be reached by a test: a failure takes seconds, not a minute.
SETTINGS = Settings(api_key=KEY, timeout=20, max_tokens=64, max_body=64 * 1024)


@dataclass
class Served:
    url: str
    server: cli.Server
    thread: threading.Thread


def start(server: cli.Server) -> Served:
    """`server` running in a thread, once it listens (on the port the system gave it)."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return Served(f"http://127.0.0.1:{port}", server, thread)


def stop(served: Served) -> None:
    served.server.handle_exit(signal.SIGTERM, None)
    served.thread.join(timeout=30)
    assert not served.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def rag_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> Path:
    return tiny_system(tmp_path_factory.mktemp("served"), tiny_bert_dir, tiny_llama_dir)


@pytest.fixture(scope="module")
def served(rag_dir: Path) -> Iterator[Served]:
    """The server as `rag-serve` builds it, with an API key and this repository's metrics."""
    settings = replace(SETTINGS, metrics=tuple(metric_rows(ROOT / "metrics")))
    running = start(cli.server(rag_dir, settings, "127.0.0.1", 0, "cpu", log="warning"))
    yield running
    stop(running)


@pytest.fixture(scope="module")
def system(rag_dir: Path) -> System:
    """The served system loaded again, apart from the server's."""
    return ask.load_system(rag_dir, "cpu")


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=30) as c:
        yield c


def chat(model: str, content: str = QUESTION, **fields: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def streamed(client: httpx.Client, body: dict[str, object]) -> list[dict]:
    """The chunks of a streamed completion, checked to end with [DONE]."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = events(r)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def assert_refusal(response: httpx.Response, status: int, param: str | None = None) -> None:
    """A refusal in OpenAI's error shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error


def assert_completion(body: dict, model: str) -> None:
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == model and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0
    assert ("passages" in body) == (model == "rag")


# --- the API -----------------------------------------------------------------------------------


def test_health_and_the_page_need_no_key(served: Served) -> None:
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "backend": "cpt-sft",
        "retriever": "hybrid",
        "models": ["rag", "sft"],
        "api_key": True,
    }
    page = httpx.get(served.url)
    assert page.status_code == 200 and 'id="ask"' in page.text
    for asset in ("playground.js", "playground.css"):
        assert httpx.get(f"{served.url}/static/{asset}").status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("GET", "/v1/metrics", None),
        ("POST", "/v1/retrieve", {"query": QUESTION}),
        ("POST", "/v1/chat/completions", chat("rag")),
    ],
)
def test_every_api_route_refuses_a_missing_or_wrong_key(
    served: Served, headers: dict[str, str], method: str, path: str, body: dict | None
) -> None:
    response = httpx.request(method, served.url + path, json=body, headers=headers)
    assert_refusal(response, 401)
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_models_are_rag_and_sft(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("rag", "model"), ("sft", "model")]


def test_metrics_are_the_runs_key_figures(client: httpx.Client) -> None:
    rows = client.get("/v1/metrics").json()["data"]
    assert {(r["stage"], r["metric"]) for r in rows} >= {("rag", "answer F1"), ("rag", "recall@5")}


def test_retrieve_gives_the_top_k_passages_best_first(client: httpx.Client) -> None:
    found = client.post("/v1/retrieve", json={"query": QUESTION, "k": 3}).json()["data"]
    assert len(found) == 3 and {p["text"] for p in found} == set(CORPUS)
    assert [p["score"] for p in found] == sorted((p["score"] for p in found), reverse=True)
    default = client.post("/v1/retrieve", json={"query": QUESTION}).json()["data"]
    assert default == found[: TINY_SYSTEM["top_k"]]


def test_rag_answers_as_rag_ask_does_with_its_passages(
    client: httpx.Client, system: System
) -> None:
    body = client.post("/v1/chat/completions", json=chat("rag")).json()
    assert_completion(body, "rag")
    expected = system.ask(QUESTION)  # greedy, the system's max tokens
    assert body["choices"][0]["message"]["content"] == expected.text
    assert [(p["id"], p["text"]) for p in body["passages"]] == [
        (h.entry.id, h.entry.text) for h in expected.passages
    ]
    assert body["usage"]["completion_tokens"] <= TINY_SYSTEM["max_new_tokens"]


def test_sft_answers_the_conversation_closed_book(client: httpx.Client) -> None:
    conversation = [
        {"role": "system", "content": "answer in one sentence ."},
        {"role": "user", "content": "what does the model learn ?"},
        {"role": "assistant", "content": "to predict masked tokens ."},
        {"role": "user", "content": "from what ?"},
    ]
    body = {"model": "sft", "messages": conversation, "max_tokens": 5}
    answer = client.post("/v1/chat/completions", json=body).json()
    assert_completion(answer, "sft")
    assert answer["usage"]["completion_tokens"] <= 5
    alone = client.post("/v1/chat/completions", json={**body, "messages": conversation[-1:]})
    # The earlier turns are in the prompt.
    assert answer["usage"]["prompt_tokens"] > alone.json()["usage"]["prompt_tokens"]


def test_sft_reads_a_chat_as_its_training_tokenized_it(
    client: httpx.Client, engine: Engine
) -> None:
    """The prompt of a multi-turn request is, token for token, the start of the training example
    of that conversation, up to where the answer is learned."""
    conversation = [
        {"role": "system", "content": "answer in one sentence ."},
        {"role": "user", "content": "what does the model learn ?"},
        {"role": "assistant", "content": "to predict masked tokens ."},
        {"role": "user", "content": "from what ?"},
    ]
    _, tokenizer = engine.sft
    answer = {"role": "assistant", "content": "from context ."}
    trained = encode_chat(tokenizer, [*conversation, answer], 1024)
    assert trained is not None
    learned = next(i for i, label in enumerate(trained.labels[::-1]) if label == -100)
    expected = trained.input_ids[: len(trained.labels) - learned]
    assert engine.chat_prompt(conversation) == expected
    body = {"model": "sft", "messages": conversation, "max_tokens": 3}
    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["prompt_tokens"] == len(expected)


@pytest.mark.parametrize("model", ["rag", "sft"])
def test_a_streamed_answer_is_the_whole_answer_in_chunks(client: httpx.Client, model: str) -> None:
    whole = client.post("/v1/chat/completions", json=chat(model)).json()
    chunks = streamed(client, chat(model))
    first, last = chunks[0], chunks[-1]
    assert {c["id"] for c in chunks} == {first["id"]} and first["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == model for c in chunks)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if model == "rag":
        assert first["passages"] == whole["passages"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.rstrip() == whole["choices"][0]["message"]["content"]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["usage"] == whole["usage"]


def test_sampling_answers_within_max_tokens(client: httpx.Client) -> None:
    for model in ("rag", "sft"):
        body = client.post(
            "/v1/chat/completions", json=chat(model, temperature=1.5, max_tokens=6)
        ).json()
        assert_completion(body, model)
        assert body["usage"]["completion_tokens"] <= 6


# Each refused in OpenAI's error shape, with the field to change where there is one.
BAD_REQUESTS = {
    "malformed JSON": ("/v1/chat/completions", b'{"model": "rag", "messages": [', 400, None),
    "not an object": ("/v1/chat/completions", b"[1, 2]", 400, None),
    "no messages": ("/v1/chat/completions", {"model": "rag", "messages": []}, 400, "messages"),
    "messages missing": ("/v1/chat/completions", {"model": "rag"}, 400, "messages"),
    "content a number": ("/v1/chat/completions", chat("rag", 42), 400, "messages.0.content"),
    "unknown role": (
        "/v1/chat/completions",
        {"model": "rag", "messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    "temperature a string": (
        "/v1/chat/completions",
        chat("rag", temperature="0.5"),
        400,
        "temperature",
    ),
    "temperature too high": (
        "/v1/chat/completions",
        chat("rag", temperature=9),
        400,
        "temperature",
    ),
    "stream a string": ("/v1/chat/completions", chat("rag", stream="yes"), 400, "stream"),
    "several answers": ("/v1/chat/completions", chat("rag", n=3), 400, "n"),
    "unknown model": ("/v1/chat/completions", chat("gpt-4"), 404, "model"),
    "max_tokens 0": ("/v1/chat/completions", chat("rag", max_tokens=0), 400, "max_tokens"),
    "max_tokens -5": ("/v1/chat/completions", chat("sft", max_tokens=-5), 400, "max_tokens"),
    "max_tokens huge": ("/v1/chat/completions", chat("rag", max_tokens=10**9), 400, "max_tokens"),
    "max_tokens a float": (
        "/v1/chat/completions",
        chat("rag", max_tokens=2.5),
        400,
        "max_tokens",
    ),
    "an empty question": ("/v1/chat/completions", chat("rag", " \u200b "), 400, "messages"),
    "last turn not the user's": (
        "/v1/chat/completions",
        {"model": "sft", "messages": [{"role": "assistant", "content": "hello"}]},
        400,
        "messages",
    ),
    "a 1 MB prompt": ("/v1/chat/completions", chat("sft", "word " * 200_000), 413, None),
    "a conversation past the context": (
        "/v1/chat/completions",
        chat("sft", "the model " * 200),
        400,
        "messages",
    ),
    "retrieve k 0": ("/v1/retrieve", {"query": QUESTION, "k": 0}, 400, "k"),
    "retrieve k a string": ("/v1/retrieve", {"query": QUESTION, "k": "2"}, 400, "k"),
    "retrieve an empty query": ("/v1/retrieve", {"query": "  "}, 400, "query"),
    "retrieve no query": ("/v1/retrieve", {"k": 2}, 400, "query"),
    "no such route": ("/v1/completions", chat("rag"), 404, None),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_is_refused_in_openai_error_shape(client: httpx.Client, case: str) -> None:
    path, body, status, param = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert_refusal(response, status, param)


def test_the_server_answers_after_refusals(client: httpx.Client) -> None:
    for case in ("malformed JSON", "a 1 MB prompt", "unknown model"):
        path, body, _, _ = BAD_REQUESTS[case]
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        assert client.post(path, **kwargs).status_code >= 400
    assert_completion(client.post("/v1/chat/completions", json=chat("rag")).json(), "rag")


def test_a_long_question_is_shortened_for_rag_not_refused(client: httpx.Client) -> None:
    body = client.post("/v1/chat/completions", json=chat("rag", "the model " * 200)).json()
    assert_completion(body, "rag")


def test_a_client_that_leaves_mid_stream_frees_the_model(client: httpx.Client) -> None:
    body = {**chat("sft", max_tokens=64), "temperature": 1.0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        next(r.iter_lines())  # the first chunk, then hang up
    start = time.monotonic()
    assert_completion(client.post("/v1/chat/completions", json=chat("rag")).json(), "rag")
    assert time.monotonic() - start < SETTINGS.timeout / 2


def test_the_openai_client_completes_and_streams(served: Served) -> None:
    openai = OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    completion = openai.chat.completions.create(model="rag", messages=MESSAGES, max_tokens=4)
    assert completion.object == "chat.completion" and completion.choices[0].message.content
    assert len(completion.model_dump()["passages"]) == TINY_SYSTEM["top_k"]
    stream = openai.chat.completions.create(
        model="sft", messages=MESSAGES, max_tokens=4, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert [m.id for m in openai.models.list()] == ["rag", "sft"]


def test_forty_requests_from_eight_clients_all_answered(client: httpx.Client) -> None:
    def request(i: int) -> tuple[str, httpx.Response]:
        if i % 2:
            return "retrieve", client.post("/v1/retrieve", json={"query": f"{QUESTION} {i}"})
        model = ("rag", "sft")[i // 2 % 2]
        return model, client.post("/v1/chat/completions", json=chat(model, max_tokens=2))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(request, range(40)))
    for kind, response in results:
        assert response.status_code == 200, response.text
        if kind == "retrieve":
            assert len(response.json()["data"]) == TINY_SYSTEM["top_k"]
        else:
            assert_completion(response.json(), kind)


# --- time limits and shutdown: a second app over the same system -------------------------------


@pytest.fixture
def engine(system: System) -> Engine:
    """A fresh engine (its own lock and stop signal) over the system loaded apart."""
    return engine_for(system, threading.Event())


def test_a_request_past_its_timeout_is_504(engine: Engine) -> None:
    with TestClient(create_app(engine, Settings(timeout=1e-6))) as local:
        for body in (chat("rag"), {"query": QUESTION}):
            path = "/v1/chat/completions" if "model" in body else "/v1/retrieve"
            engine.lock.acquire()  # busy with another request
            try:
                assert_refusal(local.post(path, json=body), 504)
            finally:
                engine.lock.release()
        # Free, but the answer is past its deadline at its first token.
        assert_refusal(local.post("/v1/chat/completions", json=chat("sft")), 504)
        with local.stream("POST", "/v1/chat/completions", json=chat("sft", stream=True)) as r:
            payloads = events(r)
    assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error"]["code"] == "timeout"


def test_once_the_server_stops_an_answer_ends_at_its_next_token(engine: Engine) -> None:
    engine.stopping.set()  # what the server does when it is asked to stop
    with TestClient(create_app(engine, Settings())) as local:
        assert_refusal(local.post("/v1/chat/completions", json=chat("sft")), 503)
        with local.stream("POST", "/v1/chat/completions", json=chat("rag", stream=True)) as r:
            payloads = events(r)
        openai = OpenAI(
            base_url=f"{local.base_url}/v1", api_key="-", http_client=local, max_retries=0
        )
        with pytest.raises(APIError, match="shutting down"):
            list(openai.chat.completions.create(model="sft", messages=MESSAGES, stream=True))
    assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error"]["code"] == "shutdown"
    assert not engine.lock.locked()


def test_a_stream_in_progress_ends_cleanly_when_the_server_stops(engine: Engine) -> None:
    config = uvicorn.Config(create_app(engine, Settings()), port=0, log_level="warning")
    running = start(cli.Server(config, engine.stopping))
    body = {**chat("sft", max_tokens=64), "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the answer has begun
        stop(running)  # as SIGTERM does: the server asks the answer to end, and waits for it
        rest = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert engine.stopping.is_set() and rest[-1] == "[DONE]"
    last = json.loads(rest[-2])
    assert last.get("error", {}).get("code") == "shutdown" or last["choices"][0]["finish_reason"]
    assert not engine.lock.locked()


# --- the other backend ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag_sequence_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_rag_dir: Path, tiny_dpr_ctx_dir: Path
) -> Path:
    """A rag-sequence system laid out as the `rag` stage saves one, untrained, over CORPUS."""
    out = tmp_path_factory.mktemp("rag-sequence") / "rag"
    model, tokenizer = rag_sequence.load_rag(str(tiny_rag_dir), TINY_SYSTEM["top_k"])
    model.save_pretrained(out / rag_sequence.MODEL_DIR)  # set to a custom index, as the stage
    tokenizer.save_pretrained(out / rag_sequence.MODEL_DIR)
    entries = [Entry(f"p{n}.0", text) for n, text in enumerate(CORPUS, start=1)]
    encoder = DPRContextEncoder.from_pretrained(tiny_dpr_ctx_dir, trust_remote_code=False)
    texts = [e.text for e in entries]
    ctx_tokenizer = AutoTokenizer.from_pretrained(tiny_dpr_ctx_dir, trust_remote_code=False)
    vectors = embed(encoder, ctx_tokenizer, texts, 32, len(texts), pool=rag_sequence.dpr_pooled)
    rag_sequence.save_kb(out, entries, vectors, build_index(vectors, "flat"))
    SystemConfig(
        retriever="dense",
        index_type="flat",
        backend=rag_sequence.BACKEND,
        model=rag_sequence.MODEL_DIR,
        **TINY_SYSTEM,
    ).write(out)
    return out


def test_a_backend_that_cannot_stream_sends_its_answer_in_one_chunk(
    rag_sequence_dir: Path,
) -> None:
    system = ask.load_system(rag_sequence_dir, "cpu")
    with TestClient(create_app(engine_for(system, threading.Event()), Settings())) as local:
        whole = local.post("/v1/chat/completions", json=chat("rag")).json()
        chunks = streamed(local, chat("rag"))
        closed_book = local.post("/v1/chat/completions", json=chat("sft")).json()
    assert_completion(whole, "rag")
    answer = system.ask(QUESTION)
    assert whole["choices"][0]["message"]["content"] == answer.text
    assert [p["id"] for p in whole["passages"]] == [h.entry.id for h in answer.passages]
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert pieces == ([answer.text] if answer.text else [])
    assert chunks[0]["passages"] == whole["passages"]
    assert_completion(closed_book, "sft")
    assert closed_book["choices"][0]["message"]["content"] == system.closed_book([QUESTION], 1)[0]


# --- the command -------------------------------------------------------------------------------


def test_serve_without_a_built_system_says_how_to_build_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([f"--rag={tmp_path}", "--port=0", f"--metrics={tmp_path}"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"serve: {tmp_path} holds no RAG system (no config.json): run `dvc repro rag`"
    ]


def test_serve_refuses_a_taken_port_before_loading_anything(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = served.url.rsplit(":", 1)[1]
    assert cli.main([f"--rag={tmp_path}", f"--port={port}", f"--metrics={tmp_path}"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"serve: cannot listen on 127.0.0.1:{port} (") and "--port" in line


def test_serve_names_a_damaged_system_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "rag"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert cli.main([f"--rag={broken}", "--port=0", f"--metrics={tmp_path}"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"serve: {broken}/config.json: not readable JSON")
    assert "dvc repro rag" in line


# --- the playground in a browser ---------------------------------------------------------------


def test_the_playground_streams_both_answers_and_shows_the_passages(
    served: Served, tmp_path: Path
) -> None:
    if (missing := missing_browser()) is not None:
        if os.environ.get("CI") == "true":  # CI must test the page, never pass by skipping it
            pytest.fail(f"{missing}: `make setup` installs Debian's chromium and chromium-driver")
        pytest.skip(missing)
    from selenium.webdriver.common.by import By

    with chromium(tmp_path / "profile") as driver:
        ask_in_playground(driver, served.url, QUESTION, KEY)
        answers = driver.find_elements(By.CSS_SELECTOR, "[data-testid=answer]")
        for box in answers:
            text = box.find_element(By.CSS_SELECTOR, "[data-testid=answer-text]").text
            status = box.find_element(By.CSS_SELECTOR, "[data-testid=answer-status]").text
            assert box.get_attribute("data-state") == "done", status
            assert text and "tokens in" in status
        passages = driver.find_elements(By.CSS_SELECTOR, "[data-testid=passage]")
        assert len(passages) == TINY_SYSTEM["top_k"]
        for passage in passages:
            assert passage.get_attribute("data-id").startswith("p")
            float(passage.find_element(By.CSS_SELECTOR, "[data-testid=score]").text)
        rag_answer = answers[1].find_element(By.CSS_SELECTOR, "[data-testid=answer-text]").text
        marked = [m.text.lower() for m in driver.find_elements(By.CSS_SELECTOR, "#passages mark")]
        assert set(marked) <= set(re.findall(r"\w[\w'-]*", rag_answer.lower()))
        assert driver.find_elements(By.CSS_SELECTOR, "#metrics tr")
        shot = tmp_path / "playground.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG")
