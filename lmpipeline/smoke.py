"""`make smoke`: the whole pipeline on the default data and bundled models with tiny step counts.

It runs `dvc repro` in a throw-away copy of the project (its own git repository and DVC cache),
so the workspace's params, outputs and `dvc.lock` stay as they are. Use it to check an install,
a new machine (`-S device=cuda`) or a code change before a full run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

# What each phase still does, in a few steps: train, checkpoint, evaluate, answer.
SMOKE_PARAMS: dict[str, dict[str, Any]] = {
    "cpt": {"max_steps": 4, "eval_steps": 2, "save_steps": 2},
    "cpt_lm": {"batch_size": 2, "max_steps": 4, "eval_steps": 2, "save_steps": 2},
    "sft": {
        "batch_size": 2,
        "max_steps": 4,
        "eval_steps": 2,
        "save_steps": 2,
        "max_new_tokens": 8,
        "samples": 2,
    },
    "rag": {
        "train": {"epochs": 1},
        "reader": {"batch_size": 2, "max_steps": 4, "eval_steps": 2, "save_steps": 2},
        "max_new_tokens": 8,
    },
}
PROJECT = [
    "dvc.yaml",
    "params.yaml",
    ".gitignore",
    ".dvcignore",
    "stages",
    "lmpipeline",
    "data",
    ".dvc",
]
NOT_COPIED = shutil.ignore_patterns("__pycache__", "cache", "tmp", "config.local")


def copy_project(src: Path, dst: Path) -> None:
    """The files `dvc repro` needs, without outputs, caches or local DVC config."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, ignore=NOT_COPIED)
        else:
            shutil.copy(src / name, dst / name)


def git_commit(repo: Path, message: str) -> None:
    """Commit everything (initialising the repository if needed), as DVC experiments expect."""
    if not (repo / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    identity = ["-c", "user.name=pipeline", "-c", "user.email=pipeline@localhost"]
    subprocess.run(["git", *identity, "commit", "-qm", message], cwd=repo, check=True)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key.path=value` pairs (values read as YAML) as nested params, like `dvc exp run -S`;
    a bare `key=value` sets a top-level key (`device=cuda`)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not all(key.split(".")):
            raise SystemExit(f"smoke: -S {pair!r}: expected key.path=value")
        *sections, name = key.split(".")
        node = overrides
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = yaml.safe_load(value)
    return overrides


def with_overrides(params: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """`params` with each layer's values set in it, at any depth."""
    merged = dict(params)
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = with_overrides(merged[key], value)
            else:
                merged[key] = value
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument(
        "--dir", type=Path, help="a new directory to build the copy in (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the copy after success")
    args = parser.parse_args(argv)
    if args.dir is not None and args.dir.exists():
        # The copy is committed into and removed after success: never what smoke did not make.
        print(f"smoke: --dir {args.dir} exists; name a directory that does not", file=sys.stderr)
        return 2

    work = args.dir or Path(tempfile.mkdtemp(prefix="pipeline-smoke-"))
    copy_project(Path.cwd(), work)
    params = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    params = with_overrides(params, SMOKE_PARAMS, parse_overrides(args.set))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    git_commit(work, "smoke")

    start = time.perf_counter()
    print(f"smoke: dvc repro in {work}", flush=True)
    status = subprocess.call(["dvc", "repro"], cwd=work)
    took = time.perf_counter() - start
    if status != 0:
        print(f"smoke: FAILED after {took:.0f} s; the copy is kept in {work}", file=sys.stderr)
        return status
    subprocess.call([sys.executable, "-m", "stages.report"], cwd=work)
    print(f"smoke: passed in {took:.0f} s")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
