"""SFT data in the shapes users hold it (prompt/response, OpenAI messages, ShareGPT, Alpaca):
validated into one conversation per record, trained on its assistant turns only, token by token
as the chat template renders it."""

import json
from functools import partial
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmpipeline import chat
from lmpipeline import tokens as token_sets
from lmpipeline.chat import load_chat_tokenizer
from lmpipeline.conversations import conversation
from lmpipeline.data import read_jsonl
from lmpipeline.testing import CORPUS, word_level_tokenizer
from stages import sft as sft_stage
from stages import tokenize as tokenize_stage
from tests.test_validate import errors, jsonl, run

WORDS = sorted({w for line in CORPUS for w in line.split()})
SYSTEM = "answer as the assistant ."


def exchange(i: int) -> list[tuple[str, str]]:
    """Two user/assistant exchanges of conversation `i`, its first question its own."""
    return [
        (f"what does the model learn {WORDS[i % len(WORDS)]} {i} ?", CORPUS[i % 3]),
        ("and the retriever ?", CORPUS[(i + 1) % 3]),
    ]


def in_shape(shape: str, i: int) -> dict:
    """Conversation `i` as a record of `shape` (Alpaca and prompt/response: one exchange)."""
    turns = exchange(i)
    if shape == "pair":
        return {"prompt": turns[0][0], "response": turns[0][1]}
    if shape == "alpaca":
        return {"instruction": turns[0][0], "input": "", "output": turns[0][1], "system": SYSTEM}
    if shape == "messages":
        messages = [{"role": "system", "content": SYSTEM}]
        for user, assistant in turns:
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        return {"messages": messages}
    conversation = [{"from": "system", "value": SYSTEM}]
    for user, assistant in turns:
        conversation += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
    return {"conversations": conversation, "id": f"c{i}"}


def validated(root: Path, records: list[dict], params: dict | None = None) -> int:
    """The sft validate stage on `records`; its outputs under `root / "out"`."""
    return run(root, "sft", jsonl(records), yaml.safe_dump({"seed": 3, **(params or {})}))


def assistant_runs(labels: list[int]) -> list[list[int]]:
    """The runs of learned tokens, in order."""
    runs: list[list[int]] = []
    for previous, label in zip([-100, *labels], labels, strict=False):
        if label != -100:
            if previous == -100:
                runs.append([])
            runs[-1].append(label)
    return runs


def expected_runs(tokenizer, messages: list[dict]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """What the template says each assistant turn is: its content, then the end of turn."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [
        [
            *tokenizer(m["content"], add_special_tokens=False, split_special_tokens=True).input_ids,
            end,
        ]
        for m in messages
        if m["role"] == "assistant"
    ]


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["pair", "messages", "sharegpt", "alpaca"])
def test_each_shape_is_validated_into_its_conversation(tmp_path: Path, shape: str) -> None:
    records = [in_shape(shape, i) for i in range(12)]
    assert validated(tmp_path, records) == 0
    out = tmp_path / "out"
    written = read_jsonl(out / "data/train.jsonl") + read_jsonl(out / "data/eval.jsonl")
    assert len(written) == 12
    if shape == "pair":  # this project's own shape stays as it was
        assert all(set(r) == {"prompt", "response"} for r in written)
        return
    first = [m for m in written if m["messages"][1]["content"] == exchange(0)[0][0]]
    turns = len(first[0]["messages"])
    assert turns == (3 if shape == "alpaca" else 5)
    assert first[0]["messages"][0] == {"role": "system", "content": SYSTEM}
    assert first[0]["messages"][-1]["role"] == "assistant"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["with_extra_fields"] == (12 if shape == "sharegpt" else 0)  # its "id"
    words = sum(len(m["content"].split()) for r in written for m in r["messages"])
    assert metrics["words"] == words


def test_a_file_of_two_shapes_is_refused_at_each_record_of_the_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [in_shape("messages", i) for i in range(6)]
    records[3] = in_shape("sharegpt", 3)
    records[5] = in_shape("pair", 5)
    assert validated(tmp_path, records) == 1
    lines = errors(capsys)
    assert lines[0].endswith(
        ":4: a ShareGPT record in a file whose first record (line 1) is OpenAI messages:"
        " one shape per file"
    )
    assert ":6: a prompt/response record" in lines[1]
    assert not (tmp_path / "out/data").exists()


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "hi there"},
                    {"role": "bot", "content": "x"},
                ]
            },
            "messages[1]: unknown role 'bot'; one of 'system', 'user', 'assistant'",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "hi there"},
                    {"from": "ai", "value": "x"},
                ]
            },
            "conversations[1]: unknown from 'ai'; one of 'system', 'human', 'gpt'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi there"},
                    {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "yes"},
                ]
            },
            "turn 2 is 'user' where the conversation needs 'assistant'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi there"},
                    {"role": "assistant", "content": "yes"},
                    {"role": "system", "content": "late"},
                ]
            },
            "turn 3 is 'system' where the conversation needs 'user'",
        ),
        (
            {
                "conversations": [
                    {"from": "gpt", "value": "hello"},
                    {"from": "human", "value": "hi"},
                ]
            },
            "turn 1 is 'gpt' where the conversation needs 'human'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi there"}]},
            "does not end with an assistant turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi there"},
                    {"role": "assistant", "content": " \u200b "},
                ]
            },
            "turn 2 (assistant) is empty once whitespace and invisible characters are removed",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi there"},
                    {"role": "assistant", "content": 7},
                ]
            },
            "messages[1]: 'content' must be a string, got int",
        ),
        ({"messages": []}, "'messages' must be a non-empty list of turns"),
        ({"messages": "hi"}, "'messages' must be a non-empty list of turns"),
        ({"messages": [["user", "hi"]]}, "messages[0] must be an object, got list"),
        ({"messages": [{"role": "user"}]}, "messages[0] has no 'content'"),
        ({"instruction": "say hi please"}, "missing key 'output'"),
        ({"instruction": "say hi please", "output": None}, "'output' is null"),
        ({"instruction": "say hi please", "output": ""}, "'output' is empty"),
        (
            {"instruction": "x", "output": "fine"},
            "'instruction' (with 'input') has 1 characters once stripped, outside [2, 4000]"
            " (validate.sft.prompt in params.yaml)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi there"},
                    {"role": "assistant", "content": "a" * 8001},
                ]
            },
            "turn 2 (assistant) has 8001 characters once stripped, outside [1, 8000]"
            " (validate.sft.response in params.yaml)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi\u0000 there"},
                    {"role": "assistant", "content": "yes"},
                ]
            },
            "not text: 'messages' holds a control character U+0000",
        ),
    ],
)
def test_a_conversation_that_is_not_one_is_refused_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record: dict, expected: str
) -> None:
    shape = "alpaca" if "instruction" in record else "messages"
    records = [in_shape(shape, i) for i in range(5)]
    if "conversations" in record:
        records = [in_shape("sharegpt", i) for i in range(5)]
    records.insert(2, record)
    assert validated(tmp_path, records) == 1
    (line, *_) = errors(capsys)
    assert ":3: " in line and expected in line, line


def test_a_conversation_start_never_lands_on_both_sides_of_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The split key is the first user turn: the same start, followed differently, is leakage."""
    records = [in_shape("messages", i) for i in range(12)]
    for i, r in enumerate(records):
        r["messages"][0]["content"] = f"{SYSTEM} {i}"  # no two records alike
        r["messages"][1]["content"] = "What does the model  LEARN ?"  # case and spacing aside
    assert validated(tmp_path, records) == 1
    assert any("which the split puts on the other side" in e for e in errors(capsys))


# --- tokens: the assistant turns and nothing else ----------------------------------------------


def test_a_three_turn_chat_with_a_system_prompt_learns_its_assistant_turns_only() -> None:
    tokenizer = word_level_tokenizer(chat=True)
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(3):
        messages += [
            {"role": "user", "content": f"what does the model learn {i} ?"},
            {"role": "assistant", "content": CORPUS[i]},
        ]
    example = chat.encode_chat(tokenizer, messages, 1024)
    assert example is not None and not example.truncated
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False).input_ids
    assert assistant_runs(example.labels) == expected_runs(tokenizer, messages)
    learned = {i for i, label in enumerate(example.labels) if label != -100}
    assert all(example.labels[i] == example.input_ids[i] for i in learned)
    # Cut inside the second answer: the first answer and the start of the second are learned.
    second = sorted(i for i in learned if i - 1 not in learned)[1]
    cut = chat.encode_chat(tokenizer, messages, second + 3)
    first, then, _ = expected_runs(tokenizer, messages)
    assert cut is not None and cut.truncated and assistant_runs(cut.labels) == [first, then[:3]]


def test_a_model_without_a_template_keeps_the_system_prompt_unlearned() -> None:
    tokenizer = word_level_tokenizer()
    chat.ensure_chat_template(tokenizer)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "what does the model learn ?"},
        {"role": "assistant", "content": CORPUS[0]},
        {"role": "user", "content": "and the retriever ?"},
        {"role": "assistant", "content": CORPUS[1]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith(SYSTEM + "\nHuman: what does the model learn ?\nAssistant: ")
    example = chat.encode_chat(tokenizer, messages, 1024)
    assert example is not None
    runs = [tokenizer.decode(run) for run in assistant_runs(example.labels)]
    assert runs == [f"{CORPUS[0]} <|endoftext|>", f"{CORPUS[1]} <|endoftext|>"]


def test_the_prompt_of_a_conversation_is_its_training_tokens_up_to_the_answer() -> None:
    """What generation reads (the server, the held-out answers) is what training read."""
    tokenizer = word_level_tokenizer(chat=True)
    messages = in_shape("messages", 4)["messages"]
    example = chat.encode_chat(tokenizer, messages, 1024)
    prompt = chat.prompt_ids(tokenizer, messages[:-1])
    assert example is not None
    assert example.input_ids[: len(prompt)] == prompt
    assert example.labels[len(prompt) - 1] == -100 and example.labels[len(prompt)] != -100


TEXT = st.lists(
    st.sampled_from([*WORDS, "?", "<|im_start|>", "<|im_end|>", "assistant"]),
    min_size=1,
    max_size=6,
).map(" ".join)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict]:
    messages = [{"role": "system", "content": draw(TEXT) + " ."}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [
            {"role": "user", "content": draw(TEXT) + " ?"},
            {"role": "assistant", "content": draw(TEXT)},
        ]
    return messages


def as_record(messages: list[dict], sharegpt: bool) -> dict:
    if not sharegpt:
        return {"messages": messages}
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chats=st.lists(conversations(), min_size=2, max_size=6), sharegpt=st.booleans())
def test_random_conversations_round_trip_and_learn_exactly_their_assistant_turns(
    tmp_path_factory: pytest.TempPathFactory, chats: list[list[dict]], sharegpt: bool
) -> None:
    root = tmp_path_factory.mktemp("chats")
    for i, messages in enumerate(chats):  # each its own start: none may leak across the split
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = f"q{i} {first['content']}"
    assert validated(root, [as_record(m, sharegpt) for m in chats]) == 0
    data = root / "out/data"
    written = read_jsonl(data / "train.jsonl") + read_jsonl(data / "eval.jsonl")
    key = partial(json.dumps, sort_keys=True)
    assert sorted(map(key, (r["messages"] for r in written))) == sorted(map(key, chats))
    tokenizer = word_level_tokenizer(chat=True)
    for messages in chats:
        example = chat.encode_chat(tokenizer, messages, 4096)
        assert example is not None
        assert assistant_runs(example.labels) == expected_runs(tokenizer, messages)


# --- the stages: every shape tokenizes and trains ----------------------------------------------


# One shape through the stages in the fast suite, every shape with the slow tests.
@pytest.mark.parametrize(
    "shape",
    [pytest.param(s, marks=pytest.mark.slow) for s in ("pair", "messages", "alpaca")]
    + ["sharegpt"],
)
def test_every_shape_tokenizes_as_the_template_says_and_trains(
    tmp_path: Path, tiny_llama_dir: Path, shape: str
) -> None:
    records = [in_shape(shape, i) for i in range(16)]
    params = {
        "sft": {
            "max_length": 96,
            "batch_size": 4,
            "max_steps": 2,
            "eval_steps": 1,
            "max_new_tokens": 4,
            "samples": 2,
            "eval_fraction": 0.25,
        }
    }
    assert validated(tmp_path, records, params) == 0
    data, tokens, p = tmp_path / "out/data", tmp_path / "tokens", tmp_path / "params.yaml"
    args = [
        "sft",
        f"--data={data}",
        f"--output={tokens}",
        f"--params={p}",
        f"--base={tiny_llama_dir}",
    ]
    assert tokenize_stage.main(args) == 0
    tokenizer, _ = load_chat_tokenizer(tiny_llama_dir)
    _, splits = token_sets.load(tokens, tokenizer, "sft", "tokenize_sft", {})
    for split in ("train", "eval"):
        rows = token_sets.Examples(splits[split])
        for record, i in zip(read_jsonl(data / f"{split}.jsonl"), range(len(rows)), strict=True):
            messages = conversation(record)
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
            assert rows[i].input_ids == tokenizer(rendered, add_special_tokens=False).input_ids
            assert assistant_runs(rows[i].labels) == expected_runs(tokenizer, messages)
    out = tmp_path / "model"
    assert (
        sft_stage.main(
            [
                f"--base={tiny_llama_dir}",
                f"--tokens={tokens}",
                f"--data={data}",
                f"--output={out}",
                f"--metrics={tmp_path / 'sft.json'}",
                f"--plots={tmp_path / 'plots'}",
                f"--samples={tmp_path / 'samples.md'}",
                f"--params={p}",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "sft.json").read_text())
    assert {"eval_loss", "gen_f1", "gen_rougeL"} <= set(metrics["final"])
    last_users = {conversation(r)[-2]["content"] for r in read_jsonl(data / "eval.jsonl")}
    headings = [
        ln[3:] for ln in (tmp_path / "samples.md").read_text().splitlines() if ln.startswith("## ")
    ]
    assert headings and set(headings) <= last_users


def test_the_turns_of_a_conversation_are_repaired_and_counted(tmp_path: Path) -> None:
    records = [in_shape("sharegpt", i) for i in range(6)]
    records[2]["conversations"][2]["value"] = "it donâ€™t stop"  # mojibake in an answer
    records[4]["conversations"][3]["value"] = "and the\ufeff retriever ?"  # a BOM mid-turn
    assert validated(tmp_path, records) == 0
    out = tmp_path / "out"
    written = read_jsonl(out / "data/train.jsonl") + read_jsonl(out / "data/eval.jsonl")
    contents = [m["content"] for r in written for m in r["messages"]]
    assert "it don\u2019t stop" in contents and "and the retriever ?" in contents
    assert not any("\ufeff" in c or "â€" in c for c in contents)
    repairs = json.loads((out / "metrics.json").read_text())["repairs"]
    assert repairs == {"mojibake": 1, "nfc": 0, "soft_hyphen": 0, "zero_width": 1}
