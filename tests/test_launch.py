"""Training stages under torchrun: two CPU processes (gloo) against one with the same batch."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from stages import launch
from stages.params import LaunchParams
from tests.test_sft import run_stage, write_project


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_trains_in_place_and_more_relaunch_under_torchrun() -> None:
    assert launch.relaunch(LaunchParams(), "stages.sft", []) is None
    command = launch.torchrun_command(LaunchParams(nproc_per_node=2), "stages.sft", ["--x=1"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert command[-3:] == ["-m", "stages.sft", "--x=1"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "rag", "rag-sequence"])
def test_ddp_keeps_the_two_processes_weights_identical(
    kind: str, tiny_llama_dir: Path, tiny_bert_dir: Path, tiny_rag_dir: Path, tmp_path: Path
) -> None:
    model = {"sft": tiny_llama_dir, "rag": tiny_bert_dir, "rag-sequence": tiny_rag_dir}[kind]
    worker = Path(__file__).with_name("ddp_worker.py")
    command = launch.torchrun_command(
        LaunchParams(nproc_per_node=2, master_port=free_port()), "", []
    )
    command = [*command[:-2], str(worker), kind, str(model), str(tmp_path / "ckpt")]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: weights equal across ranks after 4 steps" in proc.stdout


@pytest.mark.slow
def test_sft_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = {}
    for name, processes, batch in [("one", 1, 4), ("two", 2, 2)]:
        project = tmp_path / name
        project.mkdir()
        monkeypatch.chdir(project)  # checkpoints/ of each run apart
        write_project(project, batch_size=batch, epochs=2, lr=1e-3)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["launch"] = {"nproc_per_node": processes, "master_port": free_port()}
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        assert run_stage(project, tiny_llama_dir) == 0
        runs[name] = json.loads((project / "sft.json").read_text())
        assert (project / "out/model.safetensors").is_file()
    one, two = runs["one"], runs["two"]
    assert one["base"] == two["base"]  # same model, same held-out data
    assert two["final"]["eval_loss"] < two["base"]["eval_loss"]
    assert two["final"]["eval_loss"] == pytest.approx(one["final"]["eval_loss"], rel=0.02)
