"""A multi-turn chat dataset, in ShareGPT's shape, trained with `dvc exp run` and asked over HTTP.

It copies the project into a temporary directory (its own git repository and DVC cache, as
`make smoke` does) and writes `data/sft_sharegpt.jsonl`: 200 conversations made from the default
SFT data, each a system prompt, the pair's prompt and response, and a follow-up turn asking for
the answer in one sentence, answered by the response's first sentence (a rule, so no answer is
written by hand). CPT and the RAG phases run with `make smoke`'s tiny step counts; SFT runs with
the params' own. Then

    dvc exp run -S data.sft=data/sft_sharegpt.jsonl

trains, `rag-serve` starts on the result, and a two-turn chat goes to its `sft` model over HTTP.
It prints the SFT metrics, the answer, and the prompt's token count. Run it on an otherwise idle
machine.

    python -m benchmarks.sharegpt_chat [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from lmpipeline.smoke import SMOKE_PARAMS, copy_project, git_commit, with_overrides

SYSTEM = "You are a concise assistant on training language models."
FOLLOW_UP = "Can you say that in one sentence?"
SENTENCE = re.compile(r"(?<=[.!?])\s+")
CONVERSATIONS = 200
SOURCE = "data/sft_sharegpt.jsonl"


def sharegpt(pairs: list[dict[str, str]]) -> list[dict]:
    """Each pair as a two-exchange ShareGPT conversation with a system prompt."""
    return [
        {
            "id": f"chat-{i}",
            "conversations": [
                {"from": "system", "value": SYSTEM},
                {"from": "human", "value": p["prompt"]},
                {"from": "gpt", "value": p["response"]},
                {"from": "human", "value": FOLLOW_UP},
                {"from": "gpt", "value": SENTENCE.split(p["response"].strip())[0]},
            ],
        }
        for i, p in enumerate(pairs)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(work: Path, messages: list[dict[str, str]]) -> dict:
    """Start rag-serve on the copy's output, send one chat to `sft`, stop it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lmpipeline.serve", "--port", str(port), "--device", "cpu"],
        cwd=work,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"model": "sft", "messages": messages, "max_tokens": 48}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the copy")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pipeline-sharegpt-"))
    copy_project(Path.cwd(), work)
    pairs = [json.loads(line) for line in (work / "data/sft.jsonl").open(encoding="utf-8")]
    chats = sharegpt(pairs[:CONVERSATIONS])
    (work / SOURCE).write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    params = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    quick = {k: v for k, v in SMOKE_PARAMS.items() if k != "sft"}  # SFT trains in full
    params = with_overrides(params, quick)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    git_commit(work, "sharegpt chat")

    start = time.perf_counter()
    print(f"sharegpt_chat: dvc exp run -S data.sft={SOURCE} in {work}", flush=True)
    status = subprocess.call(["dvc", "exp", "run", "-S", f"data.sft={SOURCE}"], cwd=work)
    took = time.perf_counter() - start
    if status != 0:
        print(f"sharegpt_chat: FAILED after {took:.0f} s; the copy is in {work}", file=sys.stderr)
        return status
    validated = json.loads((work / "metrics/validate/sft.json").read_text())
    sft = json.loads((work / "metrics/sft.json").read_text())
    print(f"sharegpt_chat: dvc exp run took {took:.0f} s")
    print(f"validate_sft: {json.dumps(validated, sort_keys=True)}")
    print(f"sft base:  {json.dumps(sft['base'], sort_keys=True)}")
    print(f"sft final: {json.dumps(sft['final'], sort_keys=True)}")
    first = pairs[-1]  # not among the 200 trained on
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": first["prompt"]},
        {"role": "assistant", "content": first["response"]},
        {"role": "user", "content": FOLLOW_UP},
    ]
    answer = ask(work, messages)
    print(f"two-turn chat, user: {first['prompt']!r} ... {FOLLOW_UP!r}")
    print(f"sft answered: {answer['choices'][0]['message']['content']!r}")
    print(f"usage: {json.dumps(answer['usage'], sort_keys=True)}")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
