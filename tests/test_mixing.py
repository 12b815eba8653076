"""What cpt_lm trains on besides the corpus (`lmpipeline.mixing`): reading-comprehension chats
over the train passages and replayed SFT train conversations, in the training blocks alone. No
held-out block's passage and no SFT eval record may reach a training block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lmpipeline import mixing, tokens
from lmpipeline.testing import CORPUS
from stages import tokenize

WORDS = sorted({w for line in CORPUS for w in line.split()})


def passage(i: int, words: int = 9) -> str:
    """A passage of known words in an order no other passage of the test has (seeded by i)."""
    return " ".join(np.random.default_rng(i).choice(WORDS, size=words, replace=False))


def ids(tokenizer: AutoTokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def holds(stream: list[int], part: list[int]) -> bool:
    """Whether `part` occurs in `stream` as a contiguous run."""
    n = len(part)
    return any(stream[i : i + n] == part for i in range(len(stream) - n + 1))


def test_reading_chat_asks_what_the_passage_states_word_for_word() -> None:
    text = (
        "A retriever ranks the chunks of the corpus. The reader answers from the chunks it"
        " is given. Masked language modelling teaches an encoder the words of a domain."
    )
    chat = mixing.reading_chat(text, 3, seed=1)
    assert [m["role"] for m in chat] == ["user", "assistant"] * 3
    assert text in chat[0]["content"]  # the passage is read once, first
    said = mixing.sentences(text)
    for question, answer in zip(chat[::2], chat[1::2], strict=True):
        assert answer["content"] in said  # every answer is a sentence of the passage
        if "right after" in question["content"]:
            before = said[said.index(answer["content"]) - 1]
            assert f'"{before}"' in question["content"]
        else:
            begun = question["content"].split('"')[1].removesuffix(" ...")
            assert answer["content"].startswith(begun) and begun != answer["content"]
    assert mixing.reading_chat(text, 3, seed=1) == chat  # the seed and the passage decide
    assert mixing.reading_chat("Too short.", 2, seed=1) == []  # nothing to ask: no chat


@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=30),
    max_length=st.integers(1, 8),
    data=st.data(),
)
def test_clear_passages_are_those_with_no_token_in_a_held_out_block(
    sizes: list[int], max_length: int, data: st.DataObject
) -> None:
    blocks = sum(sizes) // max_length  # the packer drops the remainder
    held = np.array(data.draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks)), bool)
    clear = mixing.clear_passages(np.array(sizes), held, max_length)
    position = 0
    for n, size in enumerate(sizes):
        touched = {p // max_length for p in range(position, position + size)}
        assert clear[n] == (not any(b < blocks and held[b] for b in touched))
        position += size


def test_replay_takes_each_conversation_once_before_any_twice() -> None:
    sizes = np.array([3, 5, 2, 7])
    order = mixing.replay_order(sizes, 40, seed=0)
    assert sizes[order].sum() >= 40 > sizes[order[:-1]].sum()
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:8]) == [0, 1, 2, 3]
    assert len(mixing.replay_order(sizes, 0, seed=0)) == 0


def write_inputs(root: Path, passages: list[str], **cpt_lm: object) -> Path:
    """The corpus, validated SFT splits (a marked eval record) and params.yaml under `root`."""
    (root / "pretrain.txt").write_text("\n".join(passages) + "\n", encoding="utf-8")
    sft = root / "sft"
    sft.mkdir()
    train = [{"prompt": passage(100 + i), "response": passage(200 + i)} for i in range(6)]
    held = {"prompt": passage(300), "response": passage(301)}
    (sft / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (sft / "eval.jsonl").write_text(json.dumps(held) + "\n")
    cfg = {"enabled": True, "max_length": 16, "eval_fraction": 0.3, **cpt_lm}
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 7, "cpt_lm": cfg}))
    return root


def tokenized(root: Path, base: Path, out: str) -> tuple[dict, dict[str, list[list[int]]]]:
    args = ["cpt_lm", f"--data={root / 'pretrain.txt'}", f"--output={root / out}"]
    args += [f"--params={root / 'params.yaml'}", f"--base={base}", f"--sft={root / 'sft'}"]
    assert tokenize.main(args) == 0
    tokenizer = AutoTokenizer.from_pretrained(base)
    meta, splits = tokens.load(root / out, tokenizer, "cpt_lm", "tokenize_cpt_lm", {})
    rows = {k: tokens.TokenRows(v).column("input_ids").tolist() for k, v in splits.items()}
    return meta, rows


def test_no_held_out_passage_or_sft_eval_record_reaches_a_training_block(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    passages = [passage(i) for i in range(24)]
    root = write_inputs(tmp_path, passages, reading=1, replay=0.5)
    meta, mixed = tokenized(root, tiny_llama_dir, "mixed")
    nothing_mixed = {"enabled": True, "max_length": 16, "eval_fraction": 0.3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 7, "cpt_lm": nothing_mixed}))
    _, plain = tokenized(root, tiny_llama_dir, "plain")
    # The held-out blocks are the corpus's, the same with and without anything mixed in.
    assert mixed["held_out"] == plain["held_out"] != []
    corpus_train = len(plain["train"])
    assert mixed["train"][:corpus_train] == plain["train"]
    added = [t for block in mixed["train"][corpus_train:] for t in block]
    assert meta["mixed_blocks"] == len(mixed["train"]) - corpus_train > 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    held_out = {tuple(b) for b in plain["held_out"]}
    spans, stream = [], []
    for text in passages:  # the packer's stream, and where each passage lies in it
        spans.append(range(len(stream) // 16, (len(stream) + len(ids(tokenizer, text))) // 16 + 1))
        stream += [*ids(tokenizer, text), tokenizer.eos_token_id]
    blocks = [tuple(stream[b * 16 : b * 16 + 16]) for b in range(len(stream) // 16)]
    touching = [any(b < len(blocks) and blocks[b] in held_out for b in span) for span in spans]
    assert any(touching) and not all(touching)
    read = [holds(added, ids(tokenizer, text)) for text in passages]
    # No passage that touches a held-out block is read in a chat; every other one is, but for
    # at most one whose chat the packer cut, in the tail shorter than a block that it drops.
    assert not any(r and t for r, t in zip(read, touching, strict=True))
    assert read.count(True) >= touching.count(False) - 1
    assert meta["reading_chats"] == touching.count(False)
    train = [json.loads(line) for line in (root / "sft/train.jsonl").read_text().splitlines()]
    replayed = [holds(added, ids(tokenizer, r["response"])) for r in train]
    assert 0 < min(meta["replayed_chats"], len(train)) - 1 <= replayed.count(True)
    held = json.loads((root / "sft/eval.jsonl").read_text())
    everything = [t for block in mixed["train"] for t in block]
    assert not holds(everything, ids(tokenizer, held["prompt"]))
    assert not holds(everything, ids(tokenizer, held["response"]))
    # Replay reaches its share: tokens of SFT train chats per corpus train token.
    assert meta["mixed_tokens"] >= 0.5 * corpus_train * 16


@pytest.mark.parametrize("setting", ["replay: 11", "reading: -1"])
def test_out_of_range_mixing_is_refused_naming_the_key(
    tmp_path: Path, tiny_llama_dir: Path, setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_inputs(tmp_path, [passage(i) for i in range(8)])
    key, value = setting.split(": ")
    cfg = {"enabled": True, "max_length": 16, key: int(value)}
    (root / "params.yaml").write_text(yaml.safe_dump({"cpt_lm": cfg}))
    args = ["cpt_lm", f"--data={root / 'pretrain.txt'}", f"--output={root / 'tok'}"]
    args += [f"--params={root / 'params.yaml'}", f"--base={tiny_llama_dir}"]
    assert tokenize.main(args) == 1
    err = capsys.readouterr().err
    assert f"cpt_lm.{key}" in err or key in err
    assert "Traceback" not in err
