"""`rag-serve`: serve a built RAG system over HTTP: an OpenAI-compatible API and the playground.

    rag-serve [--rag output/rag] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    python -m lmpipeline.serve ...           make serve PORT=8000

One process loads the system (and the generator its config names) once, then answers one
request at a time. The API key may also come from LMPIPELINE_API_KEY. Like `rag-ask`, this is
answering only: it imports no training code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn
from transformers.utils import logging as hf_logging

from lmpipeline.errors import SetupError, StageError
from lmpipeline.rag.ask import load_system
from lmpipeline.report import Row, metric_rows
from lmpipeline.serve.app import Settings, create_app
from lmpipeline.serve.engine import engine_for

KEY_VARIABLE = "LMPIPELINE_API_KEY"
SHUTDOWN_GRACE_S = 10  # for responses still being sent when asked to stop; then they are cut


class Server(uvicorn.Server):
    """uvicorn's server, which also tells answers being generated to end when it is asked to
    stop (SIGINT, SIGTERM): a stream in progress then ends at its next token, with an error
    event and [DONE], instead of holding the shutdown until its last token."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)


def check_free(host: str, port: int) -> None:
    """Refuse a taken address before loading the system, which can take a while, not after."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise SetupError(
                f"cannot listen on {host}:{port} ({err.strerror}): stop what listens there or"
                " choose another port (--port, or make serve PORT=...)"
            ) from None


def server(
    rag: Path, settings: Settings, host: str, port: int, device: str = "auto", log: str = "info"
) -> Server:
    """The server of the system in `rag`, loaded, not yet started. `StageError` if it cannot
    listen there or the system cannot be loaded (none built, a damaged one)."""
    check_free(host, port)
    stopping = threading.Event()
    engine = engine_for(load_system(rag, device), stopping)
    config = uvicorn.Config(
        create_app(engine, settings),
        host=host,
        port=port,
        log_level=log,
        ws="none",  # no websocket route: no websocket library needed
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    return Server(config, stopping)


def key_metrics(metrics: Path) -> tuple[Row, ...]:
    """The rows `make repro` prints for the metrics in `metrics/`: none for a stage not run, and
    none at all, with a warning, for files this version cannot read."""
    try:
        return tuple(metric_rows(metrics))
    except (OSError, ValueError, KeyError, TypeError) as err:
        error = f"{type(err).__name__}: {err}"
        print(f"serve: {metrics}: metrics not shown ({error})", file=sys.stderr)
        return ()


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port between 0 and 65535, not {value}")
    return value


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a positive number, not {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"a positive number, not {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rag", type=Path, default=Path("output/rag"), help="the rag directory")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--api-key",
        default=os.environ.get(KEY_VARIABLE) or None,
        help=f"require `Authorization: Bearer KEY` (default: ${KEY_VARIABLE})",
    )
    p.add_argument(
        "--metrics",
        type=Path,
        default=Path("metrics"),
        help="the run's metrics directory, shown in the playground",
    )
    p.add_argument(
        "--timeout",
        type=positive(float),
        default=Settings.timeout,
        help="seconds a request may wait for the model and use it",
    )
    p.add_argument(
        "--max-tokens",
        type=positive(int),
        default=Settings.max_tokens,
        help="the longest answer a request may ask for (max_tokens)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    hf_logging.disable_progress_bar()
    settings = Settings(
        api_key=args.api_key,
        timeout=args.timeout,
        max_tokens=args.max_tokens,
        metrics=key_metrics(args.metrics),
    )
    try:
        serving = server(args.rag, settings, args.host, args.port, args.device)
    except StageError as err:
        print(err.report("serve"), file=sys.stderr)
        return 1
    url = f"http://{args.host}:{args.port}"
    print(f"serve: {args.rag} at {url} (playground at /, OpenAI-compatible API at /v1)")
    with contextlib.suppress(KeyboardInterrupt):  # raised again by uvicorn once it has stopped
        serving.run()
    return 0 if serving.started else 1
