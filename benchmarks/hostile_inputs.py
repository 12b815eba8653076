"""A corpus of bad and odd inputs, run through the validate stages and the params loader as a new
user would meet them; it prints how each was handled and every input handled wrongly.

Each bad input must be refused with one line per problem naming the file (and the line where
there is one), exit 1 and write nothing; each valid-but-odd input (BOM, CRLF, blank lines, extra
fields, no final newline, U+2028 inside a passage; under the default `validate.text: repair`, a
U+FEFF inside a line and mojibake) must be accepted. An exception escaping a stage counts as a
traceback.

    python -m benchmarks.hostile_inputs
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmpipeline.params import ParamsError, load_params
from stages import validate

GOOD_SFT = {"prompt": "Explain warmup in one line.", "response": "It ramps the rate up."}
GOOD_RAG = {"question": "What does warmup do?", "answer": "It ramps the rate up."}
GOOD_TEXT = "A passage of domain text that is long enough to pass validation."

# Field values that are not acceptable text, as JSON source (inside a string or as the value).
BAD_VALUES = {
    "NUL escape": '"a \\u0000 b c"',
    "C0 escape": '"a \\u0007 b c"',
    "DEL escape": '"a \\u007f b c"',
    "C1 escape": '"a \\u0085 b c"',
    "VT escape": '"a \\u000b b c"',
    "FS escape": '"a \\u001c b c"',
    "lone high surrogate": '"a \\ud800 b c"',
    "lone low surrogate": '"a \\udc00 b c"',
    "zero-width only": '"\\u200b\\u200c\\u200d"',
    "word joiner only": '" \\u2060 "',
    "spaces only": '"   "',
    "empty": '""',
    "object": '{"a": 1}',
    "array": '["a", "b"]',
    "number": "42",
    "huge integer": "9" * 5000,
    "boolean": "true",
    "null": "null",
    "deep array": "[" * 100_000 + "]" * 100_000,
}
# Whole lines that are not one well-formed record.
BAD_LINES = {
    "truncated JSON": b'{"prompt": "Explain the cut',
    "array line": b"[1, 2]",
    "string line": b'"just a string"',
    "number line": b"12",
    "raw NUL in line": b'{"prompt": "a\x00b", "response": "ok"}',
    "raw control in string": b'{"prompt": "a\x01b cdef", "response": "ok"}',
    "raw NEL": b'{"prompt": "a\xc2\x85b cdef", "response": "ok"}',
    "mid-file BOM": b'\xef\xbb\xbf{"prompt": "Explain x", "response": "ok"}',
    "invalid UTF-8": b'{"prompt": "Explain \xe9 x", "response": "ok"}',
    "truncated UTF-8": b'{"prompt": "Explain \xe2\x82 x", "response": "ok"}',
    "duplicate key": b'{"prompt": "Explain x", "prompt": "Explain y", "response": "ok"}',
    "NaN value": b'{"prompt": NaN, "response": "ok"}',
    "trailing comma": b'{"prompt": "Explain x", "response": "ok",}',
    "single quotes": b"{'prompt': 'Explain x', 'response': 'ok'}",
}
PRETRAIN_SEPARATORS = {
    "lone CR": "\r",
    "VT": "\x0b",
    "FF": "\x0c",
    "FS": "\x1c",
    "GS": "\x1d",
    "RS": "\x1e",
    "NEL": "\x85",
    "NUL": "\x00",
    "DEL": "\x7f",
    "BEL": "\x07",
}
BAD_PARAMS = [
    "sft:\n  lr: .nan\n",
    "sft:\n  lr: .inf\n",
    "sft:\n  lr: -1\n",
    "cpt:\n  lr: 1e400\n",
    "sft:\n  epochs: .inf\n",
    "sft:\n  weight_decay: -0.1\n",
    "sft:\n  weight_decay: .nan\n",
    "seed: -1\n",
    "seed: 99999999999999\n",
    "sft:\n  lora_alpha: 0\n",
    "launch:\n  master_port: 70000\n",
    "launch:\n  master_port: 0\n",
    "validate:\n  max_errors: -1\n",
    'device: "cpu\\n"\n',
    "device: gpu\n",
    "cpt:\n  eval_fraction: 0\n",
    "sft:\n  eval_fraction: 0\n",
    "rag:\n  top_k: 0\n",
    "rag:\n  chunk_overlap: 200\n",
    "sft:\n  batch_size: abc\n",
    "sft:\n  batch_size: 2.5\n",
    "sft:\n  lrr: 1\n",
    "- a\n- list\n",
    "",
    "sft: [1, 2]\n",
    "fp16: maybe\n",
    "cpt:\n  mlm_probability: 1.5\n",
    "rag:\n  calibration_fraction: 1.0\n",
    "rag:\n  rerank:\n    enabled: maybe\n",
]


def cases() -> Iterator[tuple[str, str, bytes, bool]]:
    """(name, dataset, file content, accepted?) for every input of the corpus."""
    for dataset, good, fields in (
        ("sft", GOOD_SFT, ("prompt", "response")),
        ("rag", GOOD_RAG, ("question", "answer")),
    ):
        lines = [json.dumps({**good, fields[0]: f"{good[fields[0]]} {i}"}) for i in range(6)]
        head = "\n".join(lines[:3]).encode() + b"\n"
        tail = "\n".join(lines[3:]).encode() + b"\n"
        for name, value in BAD_VALUES.items():
            for field in fields:
                bad = json.dumps({f: good[f] for f in fields if f != field})[:-1]
                line = f'{bad}, "{field}": {value}}}'.encode()
                yield f"{dataset} {field}: {name}", dataset, head + line + b"\n" + tail, False
        for name, line in BAD_LINES.items():
            yield f"{dataset}: {name}", dataset, head + line + b"\n" + tail, False
        yield f"{dataset}: missing key", dataset, head + b'{"x": "y"}\n' + tail, False
        yield f"{dataset}: duplicate record", dataset, head + lines[0].encode() + b"\n", False
        yield f"{dataset}: empty file", dataset, b"", False
        yield f"{dataset}: blank lines only", dataset, b"\n\n \n", False
        yield f"{dataset}: UTF-16", dataset, (head + tail).decode().encode("utf-16-le"), False
        odd = [
            ("BOM", b"\xef\xbb\xbf" + head + tail),
            ("CRLF", (head + tail).replace(b"\n", b"\r\n")),
            ("blank lines", head + b"\n\n" + tail),
            ("no final newline", head + tail.rstrip(b"\n")),
            ("extra fields", head.replace(b"}", b', "source": "web"}') + tail),
            ("escaped newline and tab", head + tail.replace(b'up."', b'up.\\n\\tNext."')),
            # validate.text: repair, the default, removes it (strict refuses it)
            ("BOM escape", head + tail.replace(b'up."', b'up.\\ufeff"')),
        ]
        for name, content in odd:
            yield f"{dataset}: {name} (valid)", dataset, content, True
    texts = [f"{GOOD_TEXT} Number {i}." for i in range(5)]
    for name, char in PRETRAIN_SEPARATORS.items():
        bad = [*texts[:2], f"{GOOD_TEXT[:30]}{char}{GOOD_TEXT[30:]}", *texts[2:]]
        yield f"pretrain: {name}", "pretrain", "\n".join(bad).encode() + b"\n", False
    for name, text in (
        ("zero-width line", "\u200b\u200d"),
        ("too short", "short"),
        ("BOM starting a later line", f"\ufeff{GOOD_TEXT}"),
    ):
        content = "\n".join([*texts, text]).encode() + b"\n"
        yield f"pretrain: {name}", "pretrain", content, False
    yield "pretrain: invalid UTF-8", "pretrain", texts[0].encode() + b"\xff\n", False
    for name, content in (
        ("U+2028 inside (valid)", "\n".join([*texts, f"{GOOD_TEXT}\u2028more"]).encode()),
        ("CRLF and BOM (valid)", b"\xef\xbb\xbf" + "\r\n".join(texts).encode() + b"\r\n"),
        ("tab inside (valid)", "\n".join([*texts, f"{GOOD_TEXT}\tmore"]).encode()),
        # validate.text: repair, the default, removes the one and decodes the other
        ("mid-line BOM (valid)", "\n".join([*texts, f"{GOOD_TEXT}\ufeffmore"]).encode()),
        ("mojibake (valid)", "\n".join([*texts, f"{GOOD_TEXT} don\u00e2\u20ac\u2122t"]).encode()),
    ):
        yield f"pretrain: {name}", "pretrain", content, True


def run_validate(dataset: str, content: bytes, work: Path) -> tuple[int | None, str, bool]:
    """(exit code or None for an escaped exception, stderr, whether anything was written)."""
    # The suffix says how the file is read (lmpipeline.sources): text for pretrain, else JSONL.
    source = work / ("input.txt" if dataset == "pretrain" else "input.jsonl")
    out = work / "out"
    source.write_bytes(content)
    err = io.StringIO()
    args = [dataset, f"--input={source}", f"--output={out / 'data'}"]
    args += [f"--metrics={out / 'm.json'}", f"--report={out / 'r.md'}"]
    args += [f"--params={work / 'params.yaml'}"]
    if dataset == "rag":
        (work / "passages.txt").write_text(GOOD_TEXT + " It ramps the rate up.\n")
        args.append(f"--passages={work / 'passages.txt'}")
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code: int | None = validate.main(args)
    except Exception as exc:  # what a user would see as a traceback
        return None, f"{type(exc).__name__}: {exc}", out.exists()
    return code, err.getvalue(), out.exists()


def main() -> int:
    handled = refused = accepted = tracebacks = 0
    wrong: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text("seed: 3\n")
        for name, dataset, content, valid in cases():
            shutil.rmtree(work / "out", ignore_errors=True)
            code, err, written = run_validate(dataset, content, work)
            if code is None:
                tracebacks += 1
                wrong.append(f"{name}: traceback {err}")
            elif valid and code == 0:
                accepted += 1
            elif not valid and code == 1 and not written and err.startswith(str(work / "input")):
                refused += 1
            else:
                wrong.append(f"{name}: exit {code}, written {written}: {err.strip()[:160]!r}")
            handled += 1
        for text in BAD_PARAMS:
            path = work / "params.yaml"
            path.write_text(text)
            try:
                load_params(path)
                wrong.append(f"params {text!r}: accepted")
            except ParamsError as err:
                refused += 1 if str(err).startswith(str(path)) else 0
                if not str(err).startswith(str(path)):
                    wrong.append(f"params {text!r}: {err}")
            except Exception as exc:
                tracebacks += 1
                wrong.append(f"params {text!r}: traceback {type(exc).__name__}: {exc}")
            handled += 1
    print(f"{handled} inputs: {refused} refused with the file (and line), {accepted} accepted,")
    print(f"{tracebacks} tracebacks, {len(wrong)} handled wrongly")
    for line in wrong:
        print(f"  WRONG {line}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
