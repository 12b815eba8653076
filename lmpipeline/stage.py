"""What every stage entry point shares: `run(params, paths)`, its paths as command-line options,
params loaded once, one line instead of a traceback for a user's mistake, and metrics and timings
written only when the stage succeeds.

A stage module (`stages/<name>.py`) declares a frozen dataclass of the paths it reads and writes,
one `--name PATH` option per field, and a `run(params, paths)`; its `main` is
`stage.main(Paths, run, argv, __doc__)` (or `launch.main` for the training stages, which may run
under torchrun).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import shutil
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from lmpipeline.data import write_text_atomic
from lmpipeline.errors import StageError
from lmpipeline.params import PARAMS_FILE, Params, field_docs, load_params

INPUT: dict[str, bool] = {"input": True}
"""The metadata of a path field the stage reads: `field(metadata=INPUT)`. It must exist before
the stage runs, or the stage says which one is missing in one line."""

CHECKPOINTS = Path("checkpoints")
"""Training checkpoints, outside DVC's outputs: they survive a crash, and go once the stage that
wrote them has written every output. One folder per configuration: `<family>-<hash>`, the family
being the stage (`sft`) or one of its training steps (`rag.reader`)."""

TIMINGS = Path(
    "output/timings"
)  # speed of the last run of each stage: tracked by neither git nor DVC


@dataclass
class StageResult:
    """What a training stage reports. `metrics` depend only on params, data and code, so the same
    inputs give a byte-identical file and DVC has nothing to rerun downstream; `timings` are this
    machine's speed on this run, written beside the outputs and never hashed by DVC."""

    metrics: dict[str, Any]
    timings: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TrainingPaths:
    """What every training stage writes besides its model: metrics, curves and timings."""

    stage: ClassVar[str]
    metrics: Path
    """The stage's metrics file (JSON, a DVC metric)."""
    plots: Path
    """Where the loss curves go (dvclive; the rag stage adds its recall@k curves)."""
    timings: Path | None = None
    """Where this run's speed goes (default output/timings/<stage>.json; not a DVC output)."""

    @property
    def timings_file(self) -> Path:
        return self.timings or TIMINGS / f"{self.stage}.json"


class Paths(Protocol):
    """A stage's paths: a frozen dataclass whose `stage` names the stage in messages."""

    @property
    def stage(self) -> str: ...


P = TypeVar("P", bound=Paths)
Run = Callable[[Params, P], StageResult | None]


def parse(paths_type: type[P], doc: str, argv: list[str] | None) -> tuple[P, Path]:
    """The stage's paths and the params file from the command line: a `--name PATH` option per
    path field (required unless it has a default), a positional argument per `str` field (its
    `choices` in the field's metadata), and `--params`. `doc`'s first paragraph is the help."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    docs = field_docs(paths_type)
    hints = typing.get_type_hints(paths_type)
    for f in dataclasses.fields(paths_type):  # type: ignore[arg-type]
        if hints[f.name] is str:
            parser.add_argument(f.name, choices=f.metadata["choices"], help=docs.get(f.name))
            continue
        required = f.default is dataclasses.MISSING
        parser.add_argument(
            f"--{f.name}",
            type=Path,
            required=required,
            default=None if required else f.default,
            help=docs.get(f.name),
        )
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params file")
    args = vars(parser.parse_args(argv))
    params_file = args.pop("params")
    return paths_type(**args), params_file


def load(stage: str, params_file: Path) -> Params | None:
    """The params, or None after printing one line that names the bad key."""
    try:
        return load_params(params_file)
    except StageError as err:
        print(err.report(stage), file=sys.stderr)
        return None


def missing_input(paths: Paths) -> str | None:
    """Why the stage cannot start (an input path that does not exist), or None."""
    for f in dataclasses.fields(paths):  # type: ignore[arg-type]
        value = getattr(paths, f.name)
        if f.metadata.get("input") and value is not None and not Path(value).exists():
            return (
                f"--{f.name} {value}: no such file or directory (where it is another stage's"
                f" output, `dvc repro {paths.stage}` makes it first)"
            )
    return None


def checkpoint_folders(family: str) -> list[Path]:
    """The checkpoint folders of `family` (`rag`) and of its steps (`rag.reader`)."""
    pattern = re.compile(rf"{re.escape(family)}(\.\w+)?-[0-9a-f]+")
    found = CHECKPOINTS.glob("*") if CHECKPOINTS.is_dir() else []
    return sorted(p for p in found if p.is_dir() and pattern.fullmatch(p.name))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def remove_checkpoints(folders: list[Path], stage: str, why: str) -> None:
    """Remove `folders`, saying how much that freed."""
    if not folders:
        return
    freed = sum(map(folder_bytes, folders))
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"{stage}: removed {len(folders)} checkpoint folder(s) {why}: {freed / 1e6:,.1f} MB freed"
    )


def execute(stage: str, run: Run[P], params: Params, paths: P) -> int:
    """Run the stage; print a user's mistake in one line (exit 1); on success write the metrics
    and timings of a training stage (with the process's peak resident memory), then remove its
    checkpoints."""
    missing = missing_input(paths)
    if missing:
        print(f"{stage}: {missing}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        result = run(params, paths)
    except StageError as err:
        print(err.report(stage), file=sys.stderr)
        return 1
    if result is None:  # nothing to record (or a rank other than 0: rank 0 records)
        return 0
    assert isinstance(paths, TrainingPaths)
    timings = {
        **result.timings,
        "stage_s": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    write_text_atomic(paths.timings_file, json.dumps(timings, indent=2) + "\n")
    write_text_atomic(paths.metrics, json.dumps(result.metrics, indent=2) + "\n")
    # Only now: a crash before this point resumes from them instead of training again.
    remove_checkpoints(checkpoint_folders(stage), stage, "now that every output is written")
    print(f"{stage}: done in {timings['stage_s']:.0f} s -> {paths.metrics}")
    return 0


def peak_rss_gib() -> float:
    """The most resident memory this process has held so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(paths_type: type[P], run: Run[P], argv: list[str] | None, doc: str) -> int:
    """A stage's entry point: parse, load the params, run."""
    paths, params_file = parse(paths_type, doc, argv)
    params = load(paths.stage, params_file)
    return 1 if params is None else execute(paths.stage, run, params, paths)
