import os

import pytest
import torch

from lmpipeline import runtime
from lmpipeline.runtime import SetupError, fingerprint, matmul_flops, precision, resolve_device


def test_auto_device_is_the_cpu_here_and_missing_devices_are_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without CUDA")
    assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SetupError, match="no CUDA device"):
        resolve_device("cuda:1")


def test_mixed_precision_is_never_chosen_for_a_cpu() -> None:
    cpu = torch.device("cpu")
    assert precision("auto", cpu) is None
    assert precision("false", cpu) is None
    with pytest.raises(SetupError, match="fp16: true needs a CUDA device"):
        precision("true", cpu)


@pytest.mark.parametrize(
    ("capability", "setting", "mode"),
    [
        ((8, 0), "auto", "bf16"),  # A100 and later: native bf16
        ((7, 0), "auto", "fp16"),  # V100 (and a T4, 7.5): bf16 only emulated, so fp16
        ((7, 5), "auto", "fp16"),
        ((9, 0), "true", "fp16"),  # asked for: fp16, loss-scaled, even where bf16 is native
        ((9, 0), "false", None),
    ],
)
def test_a_gpu_gets_bf16_only_where_native_and_fp16_when_asked(
    capability: tuple[int, int],
    setting: str,
    mode: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # is_bf16_supported() says yes on a V100 (emulation): it must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision(setting, torch.device("cuda:0")) == mode


def test_an_indexed_cuda_device_becomes_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate trains a lone process on the current CUDA device: `cuda:1` must make it so."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert chosen == [torch.device("cuda:1")]


def test_matmul_peak_is_measured_and_plausible() -> None:
    flops = matmul_flops(torch.device("cpu"), (256, 256, 256), seconds=0.2)
    assert 1e8 < flops < 1e14


def test_peak_is_the_best_of_every_shape_and_run(monkeypatch: pytest.MonkeyPatch) -> None:
    speeds = iter([5.0, 9.0, 7.0, 6.0, 8.0, 1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(runtime, "matmul_flops", lambda device, shape, dtype: next(speeds))
    peak = runtime.matmul_peak(torch.device("cpu"), hidden=32)
    # 3 shapes x 3 runs; a model 32 wide needs squares of 256 and 512 only.
    assert peak.flops == 9.0 and peak.shape == (512, 512, 512)
    assert "512x512 @ 512x512" in peak.describe()


def test_fingerprint_changes_with_any_part() -> None:
    assert fingerprint({"lr": 1e-4}, 42) == fingerprint({"lr": 1e-4}, 42)
    assert fingerprint({"lr": 1e-4}, 42) != fingerprint({"lr": 2e-4}, 42)


def test_measuring_the_peak_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    matmul_flops(torch.device("cpu"), (64, 64, 64), seconds=0.01)
    assert torch.equal(torch.rand(3), expected)  # training's dropout masks stay the same


def test_rank_0_is_a_world_of_one_once_the_process_group_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What torchrun gives rank 0, in one process: after `end_distributed` a new Trainer's
    state must see one process, not wait for the others (finding 8 of issue 26)."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    # OMP_NUM_THREADS set, or accelerate would change this test process's torch threads.
    launcher = {**world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0", "OMP_NUM_THREADS": "2"}
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert PartialState(cpu=True).distributed_type == DistributedType.MULTI_CPU
        runtime.end_distributed()
        assert not torch.distributed.is_initialized()
        assert not any(name in os.environ for name in world)
        assert PartialState(cpu=True).distributed_type == DistributedType.NO
        assert runtime.is_main_process()
    finally:  # the next test's Trainer builds its own state
        runtime.end_distributed()
        AcceleratorState._reset_state(reset_partial_state=True)
