"""Run a training stage under torchrun when `launch.*` asks for more than one process.

The stage command in dvc.yaml stays `python -m stages.<stage> ...`: with
`launch.nproc_per_node * launch.nnodes > 1` that process starts `torchrun` on the same module
and arguments and waits for it. Under torchrun the Hugging Face Trainer runs DDP (gloo on a CPU,
NCCL on GPUs unless `launch.backend` says otherwise); only rank 0 writes outputs and metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from stages.params import LaunchParams


def under_launcher() -> bool:
    """True inside a process that torchrun (or accelerate launch) started."""
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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


def relaunch(cfg: LaunchParams, module: str, argv: Sequence[str] | None) -> int | None:
    """Exit status of the stage run under torchrun, or None when this process should train."""
    if cfg.nproc_per_node * cfg.nnodes == 1 or under_launcher():
        return None
    command = torchrun_command(cfg, module, sys.argv[1:] if argv is None else argv)
    print("launch: " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)
