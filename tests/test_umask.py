"""Every file and directory the stages write has the mode the user's umask gives a plain `open`
or `mkdir`, however the stage made it (a temporary file or directory renamed into place): on a
shared machine, or through a shared DVC cache, a teammate reads what the umask lets them."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lmpipeline import data, stage
from stages import tokenize, validate
from tests.helpers import run_sft, sft_records, tiny_passages, write_sft_project

# One of each way a stage writes: renamed into place from a temporary file or directory, written
# in a directory published as one unit, or by safetensors (a model, a checkpoint's weights).
WRITTEN = [
    "output/data/pretrain",
    "output/data/sft",
    "output/data/sft/train.jsonl",
    "output/data/rag/eval.jsonl",
    "output/tokens",
    "output/tokens/blocks/data-00000-of-00001.arrow",
    "metrics/pretrain.json",
    "metrics/rag.md",
    "out/model.safetensors",
    "checkpoints/sft-*/checkpoint-*/model.safetensors",
    "sft.json",
    "samples.md",
]


# The common umask in the fast suite, a group-shared and a private one with the slow tests.
@pytest.fixture(
    params=[
        0o022,
        pytest.param(0o002, marks=pytest.mark.slow),
        pytest.param(0o077, marks=pytest.mark.slow),
    ],
    ids=oct,
)
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """The permission bits of every file and directory under `root`, by relative path."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}


def validated(project: Path, dataset: str, source: Path, *extra: str) -> None:
    out = project / "output"
    args = [
        dataset,
        f"--input={source}",
        f"--output={out / 'data' / dataset}",
        f"--metrics={project / 'metrics' / f'{dataset}.json'}",
        f"--report={project / 'metrics' / f'{dataset}.md'}",
        f"--params={project / 'params.yaml'}",
    ]
    assert validate.main([*args, *extra]) == 0


def test_every_output_follows_the_umask(
    tmp_path: Path,
    umask: int,
    tiny_bert_dir: Path,
    tiny_gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Everything under the project is made under `umask`: the inputs, and what each stage
    # writes, the checkpoints included (under the working directory, and kept to be checked).
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setattr(stage, "remove_checkpoints", lambda *args: None)
    write_sft_project(project, epochs=1, batch_size=8, max_new_tokens=1, samples=1)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["cpt"] = {"model": str(tiny_bert_dir), "max_length": 16}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    inputs = project / "inputs"
    inputs.mkdir()
    (inputs / "pretrain.txt").write_text("\n".join(tiny_passages()) + "\n")
    questions = [{"question": r["prompt"], "answer": r["response"]} for r in sft_records(8)]
    (inputs / "rag.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))

    validated(project, "pretrain", inputs / "pretrain.txt")
    validated(project, "sft", project / "data" / "train.jsonl")
    passages = f"--passages={project / 'output/data/pretrain'}"
    validated(project, "rag", inputs / "rag.jsonl", passages)
    tokens = project / "output" / "tokens"
    args = [f"--data={project / 'output/data/pretrain'}", f"--params={project / 'params.yaml'}"]
    assert tokenize.main(["cpt", *args, f"--output={tokens}"]) == 0
    assert run_sft(project, tiny_gpt2_dir) == 0

    assert [p for p in WRITTEN if not any(project.glob(p))] == []
    found = modes(project)
    expected = {p: (0o777 if (project / p).is_dir() else 0o666) & ~umask for p in found}
    assert {p: oct(m) for p, m in found.items()} == {p: oct(m) for p, m in expected.items()}


def test_the_umask_is_read_where_proc_is_missing_too(
    umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert data.umask() == umask

    def no_proc(path: str, *args: object) -> None:
        raise FileNotFoundError(path)

    monkeypatch.setattr(data, "open", no_proc, raising=False)  # shadows the builtin in data.py
    assert data.umask() == umask
    assert os.umask(umask) == umask  # read, and left as it was
