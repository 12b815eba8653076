"""Reading the user's data files as they really are, and writing the pipeline's own files.

User files may carry a UTF-8 BOM, CRLF endings and blank lines; every record keeps the line number
it came from so that errors can point at it. Files the pipeline writes are canonical (LF, sorted
keys, no timestamps) so that identical inputs give identical bytes and DVC reruns nothing for
nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BOM = b"\xef\xbb\xbf"
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class RawLine:
    """One non-blank line of a user file: its text, or why it could not be decoded."""

    number: int  # 1-based, as an editor shows it
    text: str | None
    decode_error: str | None = None


def read_lines(path: Path) -> Iterator[RawLine]:
    """Yield the non-blank lines of `path`, decoding each line on its own.

    Decoding per line lets one bad byte be reported at its line instead of failing the file.
    """
    data = path.read_bytes()
    data = data.removeprefix(BOM)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield RawLine(number, None, f"byte 0x{raw[err.start]:02x} at column {err.start + 1}")
            continue
        if text.strip():
            yield RawLine(number, text)


def prompt_key(text: str) -> str:
    """Normalize a prompt or question for leakage checks: case and spacing do not matter."""
    return _SPACES.sub(" ", text).strip().casefold()


def eval_mask(n: int, eval_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the records held out for evaluation, drawn from `seed`.

    At least one record is held out whenever eval_fraction > 0 and there are two or more records.
    """
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    return mask


def canonical_json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def read_passages(path: Path) -> list[str]:
    """The passages of a validated text file, one per line. A line ends at "\n" only:
    str.splitlines would also cut a passage at a CR, U+2028 or another separator inside it."""
    text = path.read_bytes().decode("utf-8")
    return text.removesuffix("\n").split("\n") if text else []


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file that the pipeline wrote (already validated)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(canonical_json(r) + "\n" for r in records))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` so that a crash never leaves a half-written file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
