"""Helpers of the shared training loop that need no model."""

from __future__ import annotations

from pathlib import Path

from stages.training import last_complete_checkpoint


def test_resume_skips_a_checkpoint_a_crash_left_half_written(tmp_path: Path) -> None:
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, complete in [(5, True), (10, True), (15, False)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
