"""Load on the server: `python -m lmpipeline.serve` started as a user starts it, then `--requests`
requests from `--clients` concurrent clients (retrieval, and short chat completions of both models,
whole and streamed), and their latency and the throughput. It prints figures; it asserts nothing.

    python -m benchmarks.serve_load [--rag output/rag] [--requests 200] [--clients 8]
    python -m benchmarks.serve_load --tiny     # a tiny untrained system: a self-check in seconds
    python -m benchmarks.serve_load --requests 0 --screenshot docs/playground.png

`--screenshot` also asks the playground a question in headless chromium and saves what it shows
(the README's picture comes from the trained system, never from `--tiny`).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from transformers.utils import logging as hf_logging

from benchmarks.measure import ROOT, child_env
from lmpipeline.testing import (
    ask_in_playground,
    chromium,
    missing_browser,
    tiny_bert,
    tiny_llama,
    tiny_system,
)

QUESTIONS = [
    "Who introduced FlashAttention?",
    "What is gradient accumulation?",
    "Why does a learning rate need warmup?",
    "What does a retriever do in RAG?",
    "What is the difference between CPT and SFT?",
]
KINDS = ("retrieve", "rag", "sft", "rag stream")  # the requests, in turn
START_TIMEOUT_S = 600  # loading the trained system on a slow machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(rag: Path, metrics: Path, log: Path) -> Iterator[str]:
    """The server of `rag` in a child process, once /health answers; its URL."""
    port = free_port()
    command = [sys.executable, "-m", "lmpipeline.serve", f"--rag={rag}", f"--port={port}"]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen(
            [*command, f"--metrics={metrics}"], env=child_env(), stdout=out, stderr=out
        )
    try:
        start = time.perf_counter()
        while not healthy(url):
            if server.poll() is not None or time.perf_counter() - start > START_TIMEOUT_S:
                raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        print(f"server up in {time.perf_counter() - start:.1f} s at {url} (log: {log})")
        yield url
    finally:
        server.terminate()  # SIGTERM: uvicorn's graceful shutdown
        server.wait(timeout=60)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def one_request(client: httpx.Client, i: int, max_tokens: int) -> tuple[str, float, bool]:
    """Request `i` of the mix: its kind, seconds and whether it came back well-formed."""
    kind, question = KINDS[i % len(KINDS)], QUESTIONS[i % len(QUESTIONS)]
    start = time.perf_counter()
    if kind == "retrieve":
        response = client.post("/v1/retrieve", json={"query": question})
        ok = response.status_code == 200 and bool(response.json()["data"])
        return kind, time.perf_counter() - start, ok
    body = {
        "model": kind.split()[0],
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": kind.endswith("stream"),
    }
    if body["stream"]:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        ok = response.status_code == 200 and lines[-1] == "data: [DONE]"
    else:
        response = client.post("/v1/chat/completions", json=body)
        ok = response.status_code == 200 and "content" in response.json()["choices"][0]["message"]
    return kind, time.perf_counter() - start, ok


def load(url: str, requests: int, clients: int, max_tokens: int) -> None:
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda i: one_request(client, i, max_tokens), range(requests)))
        took = time.perf_counter() - start
    print(f"{requests} requests from {clients} clients in {took:.1f} s: {requests / took:.2f}/s")
    print(f"{'kind':<12}{'n':>5}{'errors':>8}{'p50 s':>9}{'p95 s':>9}{'max s':>9}")
    for kind in [*KINDS, "all"]:
        mine = [(s, ok) for k, s, ok in results if kind in (k, "all")]
        seconds = np.array([s for s, _ in mine])
        errors = sum(not ok for _, ok in mine)
        p50, p95 = np.percentile(seconds, [50, 95])
        print(f"{kind:<12}{len(mine):>5}{errors:>8}{p50:>9.3f}{p95:>9.3f}{seconds.max():>9.3f}")


def screenshot(url: str, path: Path) -> None:
    if (missing := missing_browser()) is not None:
        raise SystemExit(f"no screenshot: {missing}")
    with tempfile.TemporaryDirectory() as profile, chromium(Path(profile)) as driver:
        ask_in_playground(driver, url, QUESTIONS[0], timeout=600)
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    print(f"playground: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rag", type=Path, default=ROOT / "output/rag")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny untrained system")
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16, help="of each chat completion")
    parser.add_argument("--screenshot", type=Path, help="save the playground, asked a question")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()  # the tiny retriever's load report would bury the figures
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rag = args.rag
        if args.tiny:
            rag = tiny_system(root, tiny_bert(root / "bert"), tiny_llama(root / "llama"))
        with running_server(rag, args.metrics, root / "server.log") as url:
            if args.requests > 0:
                load(url, args.requests, args.clients, args.max_tokens)
            if args.screenshot:
                screenshot(url, args.screenshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
