"""Faults must not lose work: a crash after training keeps the checkpoints, a stage removes only
what it owns, and a split is published as one unit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmpipeline.training import write_curves
from stages import sft as sft_stage
from tests.helpers import run_sft, write_sft_project
from tests.test_validate import GOOD, jsonl
from tests.test_validate import run as run_validate

ROOT = Path(__file__).resolve().parents[1]


def test_a_crash_while_saving_resumes_at_the_last_step_instead_of_training_again(
    tmp_path: Path,
    tiny_gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    project = write_sft_project(tmp_path, epochs=1, save_steps=3)

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # the disk fills up after the model is saved
        patch.setattr(sft_stage, "write_curves", full_disk)
        with pytest.raises(OSError, match="No space left"):
            run_sft(project, tiny_gpt2_dir)
    kept = list((tmp_path / "checkpoints").glob("sft-*/checkpoint-*"))
    assert [p.name for p in kept] == ["checkpoint-6"]  # the last step: 24 examples / 4 per step
    capsys.readouterr()

    assert run_sft(project, tiny_gpt2_dir) == 0
    out = capsys.readouterr().out
    assert "sft: resuming from checkpoints/sft-" in out and "/checkpoint-6" in out
    timings = json.loads((tmp_path / "output/timings/sft.json").read_text())
    assert timings["train"]["tokens"] == 0  # nothing trained again
    assert (tmp_path / "out/model.safetensors").is_file()
    assert "checkpoint folder(s) now that every output is written" in out
    assert not any((tmp_path / "checkpoints").iterdir())


def test_checkpoints_of_other_configurations_are_removed_saying_what_was_freed(
    tmp_path: Path,
    tiny_gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    stale = tmp_path / "checkpoints/sft-0123456789ab/checkpoint-4"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"\0" * 2_000_000)
    other_stage = tmp_path / "checkpoints/rag-0123456789ab"
    other_stage.mkdir()
    assert run_sft(write_sft_project(tmp_path, epochs=1), tiny_gpt2_dir) == 0
    out = capsys.readouterr().out
    assert "sft: removed 1 checkpoint folder(s) of other configurations: 2.0 MB freed" in out
    assert not stale.parent.exists() and other_stage.exists()  # another stage's: kept


def test_curves_replace_only_the_files_they_own(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    (plots / "plots/metrics/old").mkdir(parents=True)
    (plots / "notes.txt").write_text("mine")
    write_curves([{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 3.0}], plots)
    assert (plots / "notes.txt").read_text() == "mine"
    assert not (plots / "plots/metrics/old").exists()
    assert (plots / "plots/metrics/train/loss.tsv").read_text().splitlines()[1:] == ["1\t2.0"]


def test_smoke_never_takes_over_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, "-m", "lmpipeline.smoke", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "exists" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # no copy, no .git


def test_an_interrupted_split_never_leaves_a_new_train_beside_an_old_eval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_validate(tmp_path, "sft", jsonl(GOOD)) == 0
    data = tmp_path / "out/data"
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    changed = [{**r, "response": r["response"] + " Changed."} for r in GOOD]
    replace = os.replace
    calls = []

    def interrupted(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_validate(tmp_path, "sft", jsonl(changed))
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in data.iterdir()} if data.exists() else {}
    assert after in (before, {})  # the old split whole, or none (kept beside it): never a mix
    assert not list(tmp_path.glob("out/.data.*.tmp"))
    assert run_validate(tmp_path, "sft", jsonl(changed)) == 0
    assert all(b"Changed." in p.read_bytes() for p in data.iterdir())
