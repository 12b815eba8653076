import json
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmpipeline import validation
from lmpipeline.data import eval_mask, read_jsonl, read_passages
from lmpipeline.params import load_params
from lmpipeline.rag.knowledge import passage_chunks
from lmpipeline.text_repair import repair
from stages import cpt as cpt_stage
from stages import rag as rag_stage
from stages import sft as sft_stage
from stages import validate

ROOT = Path(__file__).resolve().parents[1]
GOOD = [
    {"prompt": f"Explain topic number {i}.", "response": f"Topic {i} is fine."} for i in range(12)
]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def run(
    tmp_path: Path,
    dataset: str,
    content: bytes,
    params: str = "seed: 3\n",
    extra: tuple[str, ...] = (),
) -> int:
    (tmp_path / "params.yaml").write_text(params, encoding="utf-8")
    source = tmp_path / f"input.{'txt' if dataset == 'pretrain' else 'jsonl'}"
    source.write_bytes(content)
    out = tmp_path / "out"
    return validate.main(
        [
            dataset,
            f"--input={source}",
            f"--output={out / 'data'}",
            f"--metrics={out / 'metrics.json'}",
            f"--report={out / 'report.md'}",
            f"--params={tmp_path / 'params.yaml'}",
            *extra,
        ]
    )


def errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        (b'{"prompt": "Explain the cut", "response": "It sto\n', "not one well-formed JSON object"),
        (b'{"prompt": "Explain warmup please"}\n', "missing key 'response'"),
        (b'{"prompt": "Explain warmup please", "response": " \\t "}\n', "'response' is empty"),
        (b'{"prompt": "Explain warmup please", "response": 42}\n', "'response' must be a string"),
        (b'{"prompt": "Explain warmup \xe9 please", "response": "ok"}\n', "not valid UTF-8"),
        (b'{"prompt": "Explain warmup please", "response": null}\n', "'response' is null"),
        (b"[1, 2]\n", "a JSON list, not an object"),
        # Text that is not text (issue 16): each was accepted, or crashed, before.
        (b'{"prompt": "Explain \\u0000 warmup", "response": "ok"}\n', "control character U+0000"),
        (b'{"prompt": "Explain warmup", "response": "o\x01k"}\n', "control character U+0001"),
        (b'{"prompt": "Explain warmup", "response": "ok \xc2\x85"}\n', "control character U+0085"),
        (b'{"prompt": "Explain \\ud800 warmup", "response": "ok"}\n', "lone surrogate U+D800"),
        (b'{"prompt": "Explain warmup", "response": "\xe2\x80\x8b \xe2\x80\x8d"}\n', "empty once"),
        (b'\xef\xbb\xbf{"prompt": "Explain warmup", "response": "ok"}\n', "U+FEFF at column 1"),
        (b'{"prompt": "Explain warmup", "prompt": "Explain x", "response": "ok"}\n', "twice"),
        (b'{"prompt": "   a   ", "response": "ok"}\n', "'prompt' has 1 characters once stripped"),
        # Values that crashed the stage with a traceback.
        (b'{"prompt": {"a": 1}, "response": "ok"}\n', "'prompt' must be a string, got dict"),
        (b'{"prompt": ["a"], "response": "ok"}\n', "'prompt' must be a string, got list"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "nested deeper"),
        (b'{"prompt": "Explain warmup", "response": ' + b"9" * 5000 + b"}\n", "refuses"),
    ],
)
def test_bad_line_is_rejected_with_file_and_line_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad_line: bytes, expected: str
) -> None:
    content = jsonl(GOOD[:3]) + bad_line + jsonl(GOOD[3:])
    assert run(tmp_path, "sft", content) == 1
    lines = errors(capsys)
    assert any(
        line.startswith(f"{tmp_path / 'input.jsonl'}:4: ") and expected in line for line in lines
    )
    assert len(lines) == 2  # the one problem, then the summary
    assert not (tmp_path / "out").exists()


def test_duplicate_record_names_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, "sft", jsonl([*GOOD, GOOD[2]])) == 1
    lines = errors(capsys)
    assert any(":3: exact duplicate of line(s) 13" in line for line in lines)
    assert any(":13: exact duplicate of line(s) 3" in line for line in lines)


def test_every_bad_line_is_reported_up_to_the_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = jsonl([{"prompt": f"Prompt {i}", "response": ""} for i in range(8)])
    assert run(tmp_path, "sft", jsonl(GOOD) + bad, "validate:\n  max_errors: 5\n") == 1
    lines = errors(capsys)
    assert sum("'response' is empty" in line for line in lines) == 5
    assert "... and 3 more" in lines[5]


def test_bom_crlf_blank_lines_and_extra_fields_are_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [{**r, "id": i, "source": "wiki"} for i, r in enumerate(GOOD)]
    content = b"\xef\xbb\xbf" + jsonl(records).replace(b"\n", b"\r\n\r\n")
    assert run(tmp_path, "sft", content) == 0
    out = tmp_path / "out"
    train, held_out = read_jsonl(out / "data/train.jsonl"), read_jsonl(out / "data/eval.jsonl")
    assert len(train) + len(held_out) == len(GOOD) and len(held_out) >= 1
    assert all(set(r) == {"prompt", "response"} for r in train + held_out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["records"] == len(GOOD) and metrics["with_extra_fields"] == len(GOOD)
    # 12 on each line (the conversation check among them) and 2 across lines
    assert "14/14 expectations met" in (out / "report.md").read_text()


def test_prompt_repeated_across_train_and_eval_is_leakage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = list(GOOD)
    held_out = eval_mask(len(records), 0.1, seed=3)
    # Repeat (with other spacing and case) a train prompt at a position the split holds out.
    train_i = int(held_out.argmin())
    eval_i = int(held_out.nonzero()[0][0])
    records[eval_i] = {"prompt": records[train_i]["prompt"].upper() + " ", "response": "Other."}
    assert run(tmp_path, "sft", jsonl(records), "seed: 3\nsft:\n  eval_fraction: 0.1\n") == 1
    lines = errors(capsys)
    assert any(f":{eval_i + 1}: prompt also at line(s) {train_i + 1}" in line for line in lines)


def test_lengths_outside_params_bounds_are_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = "validate:\n  sft:\n    response: {min_chars: 1, max_chars: 10}\n"
    assert (
        run(
            tmp_path,
            "sft",
            jsonl([*GOOD[:4], {"prompt": "Hi there", "response": "x" * 11}]),
            params,
        )
        == 1
    )
    assert any(":5: 'response' has 11 characters" in line for line in errors(capsys))


def test_pretrain_text_is_normalized(tmp_path: Path) -> None:
    text = "\ufeffA first passage about masked models.\r\n\r\nA second passage on retrieval.\n"
    assert run(tmp_path, "pretrain", text.encode()) == 0
    written = (tmp_path / "out/data").read_text(encoding="utf-8")
    assert written == "A first passage about masked models.\nA second passage on retrieval.\n"


def test_empty_file_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "rag", b"\n\n") == 1
    assert "no records" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("dataset", "name"), [("pretrain", "pretrain.txt"), ("sft", "sft.jsonl"), ("rag", "rag.jsonl")]
)
def test_default_data_passes_with_the_repository_params(
    tmp_path: Path, dataset: str, name: str
) -> None:
    params = load_params(ROOT / "params.yaml")
    source = ROOT / "data" / name
    metrics, _ = validation.validate_file(
        source, validation.DATASETS[dataset], params, tmp_path / "out"
    )
    lines = source.read_text(encoding="utf-8-sig").split("\n")
    assert metrics["records"] == sum(bool(t.strip()) for t in lines)
    minimum = {"pretrain": 400, "sft": 200, "rag": 150}[dataset]
    assert metrics["records"] >= minimum
    if dataset == "pretrain":
        assert metrics["words"] >= 30_000


RAG_PASSAGES = [
    "Adam keeps two moments of the gradient. Its default learning rate is 0.001.",
    "Dropout was introduced in 2014 and zeroes activations at random.",
]


def rag_questions(n: int) -> list[dict[str, str]]:
    answers = ["0.001", "In 2014.", "Two moments of the gradient.", "Nobody here knows this."]
    return [{"question": f"Question number {i}?", "answer": answers[i % 4]} for i in range(n)]


def test_rag_split_gains_golds_decided_from_the_answer_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passages = tmp_path / "passages.txt"
    passages.write_text("\n".join(RAG_PASSAGES) + "\n", encoding="utf-8")
    params = "seed: 3\nrag: {eval_fraction: 0.25, chunk_words: 8, chunk_overlap: 2}\n"
    assert run(tmp_path, "rag", jsonl(rag_questions(16)), params, (f"--passages={passages}",)) == 0
    out = tmp_path / "out"
    split = read_jsonl(out / "data/train.jsonl") + read_jsonl(out / "data/eval.jsonl")
    expected = {
        "0.001": ["p1.1"],  # words 7-14 of passage 1 (chunks of 8 overlapping by 2)
        "In 2014.": ["p2.0"],
        "Two moments of the gradient.": ["p1.0"],
        "Nobody here knows this.": [],  # not in corpus
    }
    assert all(r["gold"] == expected[r["answer"]] for r in split)
    metrics = json.loads((out / "metrics.json").read_text())
    held_out = sum(
        r["answer"] == "Nobody here knows this." for r in read_jsonl(out / "data/eval.jsonl")
    )
    assert metrics["gold"]["eval"]["not_in_corpus"] == held_out
    assert metrics["gold"]["train"]["not_in_corpus"] + held_out == 4
    # The question plays no part: rewording every question gives the same golds.
    reworded = [{**r, "question": f"Reworded {r['question']}"} for r in rag_questions(16)]
    assert run(tmp_path, "rag", jsonl(reworded), params, (f"--passages={passages}",)) == 0
    again = read_jsonl(out / "data/train.jsonl") + read_jsonl(out / "data/eval.jsonl")
    assert [r["gold"] for r in again] == [r["gold"] for r in split]


def test_rag_without_validated_passages_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.txt"
    assert run(tmp_path, "rag", jsonl(rag_questions(8)), extra=(f"--passages={missing}",)) == 1
    assert errors(capsys) == [
        f"validate_rag: --passages {missing}: the validated passages are needed to find the chunks"
        " that state each answer: run `dvc repro validate_pretrain` first"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "separator", ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\x00"]
)
def test_a_control_character_inside_a_passage_is_refused_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], separator: str
) -> None:
    """str.splitlines would cut such a passage in two downstream; it is no text: refused."""
    lines = [f"Passage number {i} is long enough to pass." for i in range(4)]
    lines[2] = f"Passage number 2 has a{separator}separator inside it."
    assert run(tmp_path, "pretrain", ("\n".join(lines) + "\n").encode()) == 1
    err = errors(capsys)
    assert err[0].startswith(f"{tmp_path / 'input.txt'}:3: not text: control character U+")
    assert not (tmp_path / "out").exists()


def test_unicode_line_separators_keep_one_passage_and_its_ids_everywhere(tmp_path: Path) -> None:
    """U+2028 and U+2029 are text: validation keeps each such passage as one record, and the
    readers of cpt, cpt_lm and rag see the same passages under the same line numbers."""
    lines = [
        f"Passage {i} holds a line\u2028separator and a\u2029paragraph break." for i in range(5)
    ]
    assert run(tmp_path, "pretrain", ("\n".join(lines) + "\n").encode()) == 0
    validated = read_passages(tmp_path / "out/data")
    assert validated == lines
    chunks = passage_chunks(validated, size=100, overlap=20)
    assert [c.entry.id for c in chunks] == [f"p{n}.0" for n in range(1, 6)]


def test_a_missing_or_unreadable_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "params.yaml").write_text("seed: 3\n", encoding="utf-8")
    for source, why in ((tmp_path / "nowhere.txt", "no such file"), (tmp_path, "a directory,")):
        args = ["pretrain", f"--input={source}", f"--output={tmp_path / 'out'}"]
        args += [f"--metrics={tmp_path / 'm.json'}", f"--report={tmp_path / 'r.md'}"]
        assert validate.main([*args, f"--params={tmp_path / 'params.yaml'}"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("validate_pretrain: ") and f"{source}: {why}" in err
        assert "Traceback" not in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("stage", "args", "missing"),
    [
        (cpt_stage, "--tokens none --passages none --questions none --output o", "--tokens"),
        (sft_stage, "--base none --tokens none --data none --output o --samples s.md", "--base"),
        (
            rag_stage,
            "--cpt none --sft none --data none --pretrain none --output o --predictions p.jsonl",
            "--cpt",
        ),
    ],
)
def test_a_stage_run_before_its_inputs_exist_says_which_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stage: ModuleType,
    args: str,
    missing: str,
) -> None:
    """`python -m stages.cpt` before `dvc repro validate_pretrain` (say): one line, exit 1."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 3\n", encoding="utf-8")
    assert stage.main([*args.split(), "--metrics", "m.json", "--plots", "plots"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{missing} none" in err and "no such file or directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_checks_across_lines_span_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read two lines at a time, a duplicate and a leak whose lines fall in different chunks
    are still found, with every line of each, and the problems come in file order."""
    records = list(GOOD)
    held_out = eval_mask(len(records) + 1, 0.1, seed=3)
    train_i, eval_i = int(held_out.argmin()), int(held_out.nonzero()[0][0])
    records[eval_i] = {"prompt": records[train_i]["prompt"].lower(), "response": "Other."}
    records.append(records[0])  # line 13 repeats line 1, six chunks later
    params = "seed: 3\nsft:\n  eval_fraction: 0.1\nvalidate:\n  chunk_lines: 2\n"
    assert run(tmp_path, "sft", jsonl(records), params) == 1
    lines = errors(capsys)
    assert any(":1: exact duplicate of line(s) 13" in line for line in lines)
    assert any(":13: exact duplicate of line(s) 1" in line for line in lines)
    assert any(f":{eval_i + 1}: prompt also at line(s) {train_i + 1}" in line for line in lines)
    numbers = [int(line.split(":")[1]) for line in lines[:-1]]
    assert numbers == sorted(numbers) and not (tmp_path / "out/data").exists()


def test_streamed_validation_writes_what_one_chunk_writes(tmp_path: Path) -> None:
    content = (ROOT / "data/sft.jsonl").read_bytes()
    outputs = []
    for n in (7, 100_000):
        work = tmp_path / str(n)
        work.mkdir()
        assert run(work, "sft", content, f"validate:\n  chunk_lines: {n}\n") == 0
        out = work / "out"
        outputs.append([(f.name, f.read_bytes()) for f in sorted((out / "data").iterdir())])
        outputs.append((out / "metrics.json").read_bytes())
        outputs.append((out / "report.md").read_text().replace(str(work), "<work>"))
    assert outputs[:3] == outputs[3:]


# --- validate.text: repair or strict -------------------------------------------------------------

STRICT = "validate: {text: strict}\n"
REPAIR = "validate: {text: repair, chunk_lines: 2}\n"  # two lines a chunk: counts span chunks
# "don\u2019t" (a curly apostrophe) encoded in UTF-8 and read as Windows-1252: "donâ€™t"
MOJIBAKE = "I don\u00e2\u20ac\u2122t know why this passage was mangled."
MENDED = "I don\u2019t know why this passage was mangled."
MID_LINE_BOM = "A zero-width\ufeff no-break space sits in this passage."
NFD = "Cafe\u0301 au lait is written decomposed in this passage."
# A Persian word with its ZERO WIDTH NON-JOINER, an emoji sequence with its ZERO WIDTH JOINER
JOINERS = (
    "Persian \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 and"
    " \U0001f468\u200d\U0001f469 keep their joiners."
)


def passages(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def test_repair_mends_mojibake_a_mid_line_bom_and_nfd_and_counts_each_at_its_lines(
    tmp_path: Path,
) -> None:
    plain = [f"Passage number {i} is plain and long enough." for i in range(4)]
    lines = [plain[0], MOJIBAKE, MID_LINE_BOM, plain[1], NFD, plain[2], "Soft hy\u00adphens " * 3]
    lines += [plain[3], MOJIBAKE.replace("mangled", "mangled too")]
    lines += [NFD.replace("lait", f"lait {i}") for i in range(5)]  # lines 10-14
    assert run(tmp_path, "pretrain", passages(*lines), REPAIR) == 0
    written = read_passages(tmp_path / "out/data")
    assert written[1] == MENDED
    assert written[2] == "A zero-width no-break space sits in this passage."
    assert written[4] == "Caf\u00e9 au lait is written decomposed in this passage."
    assert written[6] == "Soft hyphens Soft hyphens Soft hyphens"
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["repairs"] == {"mojibake": 2, "nfc": 6, "soft_hyphen": 1, "zero_width": 1}
    report = (tmp_path / "out/report.md").read_text()
    assert "## Repairs" in report
    rows = ["| mojibake | 2 | 2, 9 |", "| zero_width | 1 | 3 |", "| soft_hyphen | 1 | 7 |"]
    for row in [*rows, "| nfc | 6 | 5, 10, 11, 12, 13, ... |"]:  # the first five lines
        assert row in report


def test_strict_refuses_a_mid_line_bom_and_keeps_valid_text_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = [f"Passage number {i} is plain and long enough." for i in range(3)]
    assert run(tmp_path, "pretrain", passages(*plain[:2], MID_LINE_BOM), STRICT) == 1
    assert errors(capsys)[0] == (
        f"{tmp_path / 'input.txt'}:3: not text: byte-order mark U+FEFF at column 13"
        " (files joined together?); remove it"
    )
    lines = [*plain, NFD, MOJIBAKE, "Soft hy\u00adphens stay as they are here."]
    assert run(tmp_path, "pretrain", passages(*lines), STRICT) == 0
    assert read_passages(tmp_path / "out/data") == lines
    assert "repairs" not in json.loads((tmp_path / "out/metrics.json").read_text())
    assert "## Repairs" not in (tmp_path / "out/report.md").read_text()


@pytest.mark.parametrize("policy", [STRICT, REPAIR])
@pytest.mark.parametrize("control", ["\x0b", "\x85", "\x7f", "\x00"])
def test_a_control_character_is_refused_under_both_policies_even_beside_mojibake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str, control: str
) -> None:
    plain = [f"Passage number {i} is plain and long enough." for i in range(3)]
    bad = MOJIBAKE.replace("know", f"kn{control}ow")
    assert run(tmp_path, "pretrain", passages(*plain, bad), policy) == 1
    err = errors(capsys)
    assert err[0].startswith(f"{tmp_path / 'input.txt'}:4: not text: control character U+00")
    assert f"U+{ord(control):04X}" in err[0] and len(err) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("policy", [STRICT, REPAIR])
def test_a_bom_that_starts_a_later_line_is_refused_under_both_policies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str
) -> None:
    """What joined files leave: no repair may take it for a zero-width space."""
    plain = [f"Passage number {i} is plain and long enough." for i in range(4)]
    plain[2] = "\ufeff" + plain[2]
    assert run(tmp_path, "pretrain", passages(*plain), policy) == 1
    assert errors(capsys)[0] == (
        f"{tmp_path / 'input.txt'}:3: not text: byte-order mark U+FEFF at column 1"
        " (files joined together?); remove it"
    )


def test_a_c1_control_that_is_no_mojibake_is_refused_under_repair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ftfy would read U+0085 as the "…" of Windows-1252; it is NEXT LINE, a line break to
    str.splitlines: refused, where mojibake's own C1 bytes are decoded (`â€\\x9d`, a quote)."""
    quoted = "He said \u00e2\u20ac\u0153fine\u00e2\u20ac\x9d and left the passage."
    nel = ["A NEL\x85 is no ellipsis here.", "Nor at the end, which strip() takes\x85"]
    assert run(tmp_path, "pretrain", passages(quoted, *nel), REPAIR) == 1
    assert errors(capsys)[:2] == [
        f"{tmp_path / 'input.txt'}:2: not text: control character U+0085 at column 6",
        f"{tmp_path / 'input.txt'}:3: not text: control character U+0085 at column 36",
    ]
    assert run(tmp_path, "pretrain", passages(quoted, "A plain passage, long enough."), REPAIR) == 0
    assert (
        read_passages(tmp_path / "out/data")[0] == "He said \u201cfine\u201d and left the passage."
    )


def test_repaired_jsonl_fields_are_what_the_splits_hold_and_what_duplicates_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [dict(r) for r in GOOD]
    records[3] = {"prompt": "Explain the caf\u00e9 topic.", "response": MOJIBAKE}
    records[5] = {"prompt": "Explain \ufeffwarmup.", "response": "It ramps up.\u00ad"}
    content = jsonl(records)  # json.dumps escapes the U+FEFF: the field decodes to it
    assert b"\\ufeff" in content
    assert run(tmp_path, "sft", content, REPAIR) == 0
    out = tmp_path / "out"
    split = read_jsonl(out / "data/train.jsonl") + read_jsonl(out / "data/eval.jsonl")
    assert {"prompt": "Explain warmup.", "response": "It ramps up."} in split
    assert {"prompt": "Explain the caf\u00e9 topic.", "response": MENDED} in split
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["repairs"] == {"mojibake": 1, "nfc": 0, "soft_hyphen": 1, "zero_width": 1}
    # The same prompt in NFD is the same record once repaired: an exact duplicate.
    records.append({**records[3], "prompt": "Explain the cafe\u0301 topic."})
    assert run(tmp_path, "sft", jsonl(records), REPAIR) == 1
    assert any(":4: exact duplicate of line(s) 13" in line for line in errors(capsys))
    records[5] = GOOD[5]  # strict refuses its U+FEFF; it keeps NFD: two records
    assert run(tmp_path, "sft", jsonl(records), STRICT) == 0


def test_repaired_rag_answers_are_what_the_split_holds(tmp_path: Path) -> None:
    passages_file = tmp_path / "passages.txt"
    passages_file.write_text("\n".join(RAG_PASSAGES) + "\n", encoding="utf-8")
    records = rag_questions(8)
    records[2] = {"question": "Question number 2?", "answer": "In 2014.\u200b"}
    extra = (f"--passages={passages_file}",)
    assert run(tmp_path, "rag", jsonl(records), REPAIR, extra) == 0
    out = tmp_path / "out"
    split = read_jsonl(out / "data/train.jsonl") + read_jsonl(out / "data/eval.jsonl")
    repaired = next(r for r in split if r["question"] == "Question number 2?")
    assert repaired["answer"] == "In 2014." and repaired["gold"] == ["p2.0"]


def test_zero_width_joiners_are_kept(tmp_path: Path) -> None:
    plain = [f"Passage number {i} is plain and long enough." for i in range(3)]
    assert run(tmp_path, "pretrain", passages(*plain, JOINERS), REPAIR) == 0
    assert read_passages(tmp_path / "out/data")[3] == JOINERS
    assert "repairs" not in json.loads((tmp_path / "out/metrics.json").read_text())


def test_an_unknown_text_policy_is_refused_by_the_params_loader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, "pretrain", passages(MOJIBAKE), "validate: {text: fix}\n") == 1
    assert "validate.text must be repair|strict, got 'fix'" in capsys.readouterr().err


# What repairs meet, and what may bring pieces of mojibake together: mojibake of quotes and
# letters (with the C1 bytes and soft hyphen that Windows-1252 reading leaves), zero-width
# characters and joiners, combining marks, letters that look like mojibake on their own.
PIECES = [*"aeÃÂâ€™œ\x9d\x8d\u00ad\u200b\u200c\u200d\u2060\ufeff\u0301\u0308 ©®»¿ïé", "â€™"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(st.sampled_from(PIECES)).map("".join)))
def test_repaired_text_is_nfc_without_what_repair_removes_and_stays_as_it_is(text: str) -> None:
    repaired, kinds = repair(text)
    assert unicodedata.is_normalized("NFC", repaired)
    assert not set(repaired) & set("\u200b\u2060\ufeff\u00ad")
    assert set(text) & set("\u200c\u200d") <= set(repaired)  # the joiners are kept
    assert kinds or repaired == text  # no change goes uncounted
    assert repair(repaired) == (repaired, ())
