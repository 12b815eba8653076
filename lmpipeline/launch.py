"""Run a training stage under torchrun when `launch.*` asks for more than one process.

The stage command in dvc.yaml stays `python -m stages.<stage> ...`: with
`launch.nproc_per_node * launch.nnodes > 1` that process starts `torchrun` on the same module
and arguments and waits for it. Under torchrun the Hugging Face Trainer runs DDP (gloo on a CPU,
NCCL on GPUs unless `launch.backend` says otherwise), or FSDP2 with `launch.strategy: fsdp`;
only rank 0 writes outputs and metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from lmpipeline import stage
from lmpipeline.errors import StageError
from lmpipeline.params import LaunchParams
from lmpipeline.runtime import end_distributed, under_launcher


def torchrun_command(cfg: LaunchParams, module: str, argv: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={cfg.nproc_per_node}",
        f"--nnodes={cfg.nnodes}",
        f"--node_rank={cfg.node_rank}",
        f"--master_addr={cfg.master_addr}",
        f"--master_port={cfg.master_port}",
        "-m",
        module,
        *argv,
    ]


def check_strategy(cfg: LaunchParams, device: str) -> None:
    """Stop before any process starts when FSDP cannot shard: accelerate runs processes that are
    not on CUDA GPUs as DDP, so FSDP on a CPU would silently keep a full copy per process."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cfg.strategy == "fsdp" and not cuda:
        raise StageError(
            f"launch.strategy fsdp needs CUDA GPUs, and device {device!r} gives none here"
            " (accelerate would run plain DDP instead): set launch.strategy to ddp"
        )


def relaunch(cfg: LaunchParams, device: str, module: str, argv: Sequence[str] | None) -> int | None:
    """Exit status of the stage run under torchrun, or None when this process should train."""
    if cfg.nproc_per_node * cfg.nnodes == 1 and not under_launcher():
        return None
    check_strategy(cfg, device)
    if under_launcher():
        return None
    command = torchrun_command(cfg, module, sys.argv[1:] if argv is None else argv)
    print("launch: " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)


def exit_process(status: int) -> NoReturn:
    """Leave a stage's process with `status`. Under torchrun, skip the C++ static destructors
    (os._exit, after flushing): even after `destroy_process_group`, they can find a gloo thread
    still joinable and abort a process that had finished and written everything ("terminate
    called without an active exception", in about 1 run in 20 of two CPU processes here), which
    torchrun and then DVC would report as a failed stage."""
    if not under_launcher():
        sys.exit(status)
    end_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(
    paths_type: type[stage.P],
    run: stage.Run[stage.P],
    argv: list[str] | None,
    doc: str,
    module: str,
) -> int:
    """A training stage's entry point: `stage.main`, but with more than one process asked for,
    this process starts the stage's `module` under torchrun and waits for it."""
    paths, params_file = stage.parse(paths_type, doc, argv)
    params = stage.load(paths.stage, params_file)
    if params is None:
        return 1
    try:
        status = relaunch(params.launch, params.device, module, argv)
    except StageError as err:
        print(err.report(paths.stage), file=sys.stderr)
        return 1
    return stage.execute(paths.stage, run, params, paths) if status is None else status
