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
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmpipeline.errors import StageError

BOM = b"\xef\xbb\xbf"
_SPACES = re.compile(r"\s+")
# Characters that take no space on screen: zero-width space, non-joiner and joiner, word joiner
# and the byte-order mark. A value made of them and whitespace is empty to a reader.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# What `text_problem` refuses, as one pattern: a line of text passes in one C-level scan.
_NOT_TEXT = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufeff"
_NOT_TEXT_LINE = re.compile(f"[{_NOT_TEXT}\n\r]")
_NOT_TEXT_MULTILINE = re.compile(f"[{_NOT_TEXT}]")


@dataclass(frozen=True)
class RawLine:
    """One non-blank line of a user file: its text, or why it could not be decoded."""

    number: int  # 1-based, as an editor shows it
    text: str | None
    decode_error: str | None = None


def read_input(path: Path) -> bytes:
    """The bytes of an input file, or a one-line error naming it (`open_input`)."""
    with open_input(path) as f:
        return f.read()


def open_input(path: Path) -> IO[bytes]:
    """An input file opened for reading bytes, or a one-line error naming it: missing, a
    directory, or unreadable (a stage run by hand before the stage that makes its input)."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise StageError(f"{path}: no such file (`dvc repro` makes the pipeline's own)") from None
    except IsADirectoryError:
        raise StageError(f"{path}: a directory, not a file") from None
    except PermissionError:
        raise StageError(f"{path}: not readable (permission denied)") from None


def read_lines(path: Path) -> Iterator[RawLine]:
    """Yield the non-blank lines of `path`, decoding each line on its own, as the file is read:
    memory holds one line at a time, whatever the file's size.

    Decoding per line lets one bad byte be reported at its line instead of failing the file.
    A line ends at "\n" only (a CR before it is dropped), in every reader of the project.
    """
    with open_input(path) as f:
        for number, raw in enumerate(f, start=1):  # a binary file splits at b"\n" only
            if number == 1:
                raw = raw.removeprefix(BOM)
            line = decoded(number, raw.removesuffix(b"\n").removesuffix(b"\r"))
            if line is not None:
                yield line


def decoded(number: int, raw: bytes) -> RawLine | None:
    """Line `number` decoded, or why it cannot be; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawLine(number, None, f"byte 0x{raw[err.start]:02x} at column {err.start + 1}")
    return RawLine(number, text) if text.strip() else None


def text_problem(text: str, multiline: bool, repairable: bool = False) -> str | None:
    """What makes `text` not text, or None: a control character other than tab (and, where
    `multiline`, inside a JSON string, LF and CR), a lone surrogate, or a byte-order mark past
    the start of the file. Columns count from 1 within `text`.

    With `repairable`, what `validate.text: repair` mends is let through, to be checked again
    once repaired: a C1 control (it may be a byte of mojibake) and a U+FEFF inside a line or a
    JSON string (a zero-width no-break space). A U+FEFF that starts a line is what joined
    files leave: refused all the same."""
    if not (_NOT_TEXT_MULTILINE if multiline else _NOT_TEXT_LINE).search(text):
        return None
    for column, char in enumerate(text, start=1):
        code = ord(char)
        if char == "\t" or (multiline and char in "\n\r"):
            continue
        if repairable and (0x80 <= code <= 0x9F or (code == 0xFEFF and (multiline or column > 1))):
            continue
        if code < 0x20 or 0x7F <= code <= 0x9F:
            hint = " (a UTF-16 file? re-save it as UTF-8)" if code == 0 else ""
            return f"control character U+{code:04X} at column {column}{hint}"
        if 0xD800 <= code <= 0xDFFF:
            return f"lone surrogate U+{code:04X} at column {column}, which is not a character"
        if code == 0xFEFF:
            return f"byte-order mark U+FEFF at column {column} (files joined together?); remove it"
    return None


def visible(text: str) -> str:
    """`text` without surrounding whitespace and without invisible characters."""
    return text.translate(INVISIBLE).strip()


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
    text = read_input(path).decode("utf-8")
    return text.removesuffix("\n").split("\n") if text else []


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file that the pipeline wrote (already validated)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_text(records: Iterable[dict[str, Any]]) -> str:
    return "".join(canonical_json(r) + "\n" for r in records)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, jsonl_text(records))


@contextmanager
def publishing_dir(output: Path) -> Iterator[Path]:
    """A new directory to fill, which takes `output`'s place as one unit when the block ends
    without an error (and is removed when it raises). A reader, or a crash, sees the old files or
    the new ones, never some of each (a new train split beside an old eval split); a crash
    between the two renames leaves no `output`, and the old files in `.<name>.old` beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    old = output.with_name(f".{output.name}.old")
    try:
        follow_umask(new)
        yield new
        shutil.rmtree(old, ignore_errors=True)
        if output.exists():
            os.replace(output, old)
        os.replace(new, output)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def file_digest(path: Path) -> str:
    with open_input(path) as f:  # read in blocks: the file may be larger than memory
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` so that a crash never leaves a half-written file at `path`."""
    with writing_atomic(path) as f:
        f.write(text)


@contextmanager
def writing_atomic(path: Path) -> Iterator[IO[str]]:
    """A text file to write, which becomes `path` when the block ends without an error: a crash,
    or an error, never leaves a half-written file there (nor the temporary one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            follow_umask(fd)
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def follow_umask(made: Path | int) -> None:
    """Give `made` (a path or an open descriptor), created private whatever the umask (as
    `tempfile` makes a file, 0o600, or a directory, 0o700), the mode a plain `open` or `mkdir`
    would have given it. It is, or becomes by a rename, an output: who else may read those (a
    teammate on a shared machine, or through a shared DVC cache) is the user's umask to say."""
    full = 0o777 if stat.S_ISDIR(os.stat(made).st_mode) else 0o666
    os.chmod(made, full & ~umask())


def umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status (since 4.7): read there, it stays
    untouched. Elsewhere the only way is to set it and set it back, and a file another thread
    creates in between gets the mask set meanwhile: 0o077, private rather than too open."""
    try:
        with open("/proc/self/status", "rb") as status:  # bytes: the process name may not decode
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:  # no /proc: not Linux, or a sandbox without it
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
