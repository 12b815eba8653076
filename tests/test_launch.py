"""Training stages under torchrun: two CPU processes (gloo) against one with the same batch,
two machines against one, DDP against FSDP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmpipeline import launch
from lmpipeline.params import LaunchParams
from stages import sft as sft_stage
from tests.helpers import rag_project, run_sft, sft_args, tiny_rag, write_sft_project


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_trains_in_place_and_more_relaunch_under_torchrun() -> None:
    assert launch.relaunch(LaunchParams(), "cpu", "stages.sft", []) is None
    command = launch.torchrun_command(LaunchParams(nproc_per_node=2), "stages.sft", ["--x=1"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert command[-3:] == ["-m", "stages.sft", "--x=1"]


def run_worker(kind: str, strategy: str, model: Path, out: Path, mode: str = "fp32") -> str:
    """tests/ddp_worker.py on two CPU processes; its stdout."""
    worker = Path(__file__).with_name("ddp_worker.py")
    command = launch.torchrun_command(
        LaunchParams(nproc_per_node=2, master_port=free_port()), "", []
    )
    command = [*command[:-2], str(worker), kind, strategy, str(model), str(out), mode]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=out, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_ddp_keeps_the_two_processes_rag_sequence_weights_identical(
    tiny_rag_dir: Path, tmp_path: Path
) -> None:
    """Each rank retrieves from its own copy of the index while DDP syncs the RAG model."""
    stdout = run_worker("rag-sequence", "ddp", tiny_rag_dir, tmp_path)
    for rank in (0, 1):
        assert f"rank {rank}: weights equal across ranks" in stdout
        assert f"rank {rank}: 4 steps" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "rag"])
def test_ddp_keeps_bf16_autocast_on_after_the_first_step(
    kind: str, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """DDP's forward replaces the model's for the loss, once per step; the model's own forward,
    accelerate's autocast wrapper, used to be deleted after the first, so every later step was
    fp32 (finding 2 of issue 26)."""
    model = tiny_llama_dir if kind == "sft" else tiny_bert_dir
    stdout = run_worker(kind, "ddp", model, tmp_path, "bf16")
    for rank in (0, 1):
        assert f"rank {rank}: bf16 autocast in every one of 4 steps" in stdout
        assert f"rank {rank}: weights equal across ranks" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "cpt", "rag"])
def test_fsdp_shards_the_model_and_trains_it_as_ddp_does(
    kind: str, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    model = tiny_llama_dir if kind == "sft" else tiny_bert_dir
    ddp = run_worker(kind, "ddp", model, tmp_path)
    fsdp = run_worker(kind, "fsdp", model, tmp_path)
    for rank in (0, 1):
        assert f"rank {rank}: weights equal across ranks" in ddp  # and moved
        held = re.search(rf"rank {rank}: holds (\d+) of (\d+) parameter values", fsdp)
        assert held and int(held[1]) < 0.6 * int(held[2])
    # The same steps, sharded: the gathered weights and the held-out losses logged during
    # training (scored by every rank, the model's top level gathered) match DDP's.
    by_ddp, by_fsdp = (load_file(tmp_path / s / "model.safetensors") for s in ("ddp", "fsdp"))
    assert by_ddp.keys() == by_fsdp.keys()
    for name, weight in by_ddp.items():
        torch.testing.assert_close(by_fsdp[name], weight, rtol=0, atol=1e-6, msg=name)
    losses = [json.loads((tmp_path / f"{s}.json").read_text()) for s in ("ddp", "fsdp")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert len(losses[0]) == (0 if kind == "rag" else 2)


def test_fsdp_without_cuda_stops_before_any_process_starts(
    tmp_path: Path,
    tiny_llama_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    write_sft_project(tmp_path, batch_size=2, epochs=1, lr=1e-3)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["device"] = "cpu"
    params["launch"] = {"nproc_per_node": 2, "strategy": "fsdp"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = sft_args(tmp_path, tiny_llama_dir)  # tokenizes: no launch there
    capsys.readouterr()
    assert sft_stage.main(args) == 1
    assert capsys.readouterr().err.startswith("sft: launch.strategy fsdp needs CUDA GPUs")
    assert not (tmp_path / "out").exists() and not (tmp_path / "sft.json").exists()


@pytest.mark.slow
def test_sft_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = {}
    for name, processes, batch in [("one", 1, 4), ("two", 2, 2)]:
        project = tmp_path / name
        project.mkdir()
        monkeypatch.chdir(project)  # checkpoints/ of each run apart
        write_sft_project(project, batch_size=batch, epochs=2, lr=1e-3)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["launch"] = {"nproc_per_node": processes, "master_port": free_port()}
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        assert run_sft(project, tiny_llama_dir) == 0
        runs[name] = json.loads((project / "sft.json").read_text())
        assert (project / "out/model.safetensors").is_file()
    one, two = runs["one"], runs["two"]
    assert one["base"] == two["base"]  # same model, same held-out data
    assert two["final"]["eval_loss"] < two["base"]["eval_loss"]
    assert two["final"]["eval_loss"] == pytest.approx(one["final"]["eval_loss"], rel=0.02)


@pytest.mark.slow
def test_sft_on_two_machines_of_one_process_matches_one_machine_of_two(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """The README's multi-node recipe, both "machines" on this one: the same stage command in
    two copies of the project, differing only in launch.node_rank."""
    port = free_port()
    layouts = {
        "machine": {"nproc_per_node": 2, "master_port": port},
        "node0": {"nnodes": 2, "node_rank": 0, "master_port": port},
        "node1": {"nnodes": 2, "node_rank": 1, "master_port": port},
    }
    for name, launch_params in layouts.items():
        project = tmp_path / name
        project.mkdir()
        write_sft_project(project, batch_size=2, epochs=2, lr=1e-3)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["launch"] = launch_params
        (project / "params.yaml").write_text(yaml.safe_dump(params))

    def start(name: str) -> subprocess.Popen[bytes]:
        project = tmp_path / name
        command = [sys.executable, "-m", "stages.sft", *sft_args(project, tiny_llama_dir)]
        log = (project / "stage.log").open("w")
        return subprocess.Popen(command, cwd=project, stdout=log, stderr=subprocess.STDOUT)

    def finish(name: str, process: subprocess.Popen[bytes]) -> None:
        status = process.wait(timeout=300)
        assert status == 0, (tmp_path / name / "stage.log").read_text()[-3000:]

    finish("machine", start("machine"))
    nodes = {name: start(name) for name in ("node0", "node1")}
    for name, process in nodes.items():
        finish(name, process)
    assert not (tmp_path / "node1/out").exists() and not (tmp_path / "node1/sft.json").exists()
    by_machine, by_nodes = (
        json.loads((tmp_path / name / "sft.json").read_text()) for name in ("machine", "node0")
    )
    assert by_nodes == by_machine  # the same two ranks, whichever machines they run on
    assert by_nodes["final"]["eval_loss"] < by_nodes["base"]["eval_loss"]


@pytest.mark.slow
def test_rag_stage_with_the_reader_finishes_on_two_processes(
    tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> None:
    """The retriever trains on both ranks and ends the process group; rank 0 then trains the
    cross-fitting folds and the reader alone. Its next Trainer used to expect a world of two and
    wait for ever for a rank that had exited."""
    params = {
        "cpt": {"model": str(tiny_bert_dir)},
        "rag": tiny_rag(
            train={"batch_size": 2, "epochs": 1},
            reader={"enabled": True, "batch_size": 2, "max_length": 128},
        ),
        "launch": {"nproc_per_node": 2, "master_port": free_port()},
    }
    args = rag_project(tmp_path, params, tiny_bert_dir, tiny_llama_dir)
    command = [sys.executable, "-m", "stages.rag", *args]
    log = (tmp_path / "stage.log").open("w")
    # A session of its own: a hang is killed with torchrun's workers, not only the launcher.
    stage = subprocess.Popen(
        command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        status = stage.wait(timeout=240)  # about 30 s here
    except subprocess.TimeoutExpired:
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait()
        status = None
    assert status == 0, (tmp_path / "stage.log").read_text()[-3000:]
    metrics = json.loads((tmp_path / "metrics/rag.json").read_text())
    assert metrics["reader"]["examples"] == 4
    timings = json.loads((tmp_path / "output/timings/rag.json").read_text())
    assert timings["reader"]["tokens_per_s"] > 0
