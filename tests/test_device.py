"""Where the pipeline runs (device, dtype), how many torch threads a worker takes, and the live-worker count."""

import os
import subprocess
import sys

import pytest
import torch

from handler.model.device import Placement, WorkerRegistry, choose_placement, threads_per_worker
from handler.core.settings import HandlerSettings


def settings(**values) -> HandlerSettings:
    return HandlerSettings.from_mapping(values)


# --- choose_placement ----------------------------------------------------------------------------------------


def test_cuda_available_uses_the_assigned_gpu_in_float16():
    assert choose_placement(settings(), cuda_available=True, gpu_id=3) == Placement("cuda:3", torch.float16)


def test_no_gpu_id_means_cuda_0():
    assert choose_placement(settings(), cuda_available=True, gpu_id=None) == Placement("cuda:0", torch.float16)


def test_gpu_id_0_is_not_treated_as_missing():
    assert choose_placement(settings(), cuda_available=True, gpu_id=0).device == "cuda:0"


def test_no_cuda_means_cpu_float32():
    assert choose_placement(settings(), cuda_available=False, gpu_id=None) == Placement("cpu", torch.float32)
    assert choose_placement(settings(), cuda_available=False, gpu_id=1) == Placement("cpu", torch.float32)


def test_device_cpu_wins_over_an_available_gpu():
    placement = choose_placement(settings(device="cpu"), cuda_available=True, gpu_id=1)
    assert placement == Placement("cpu", torch.float32)


def test_device_cuda_without_cuda_fails():
    with pytest.raises(RuntimeError, match="CUDA"):
        choose_placement(settings(device="cuda"), cuda_available=False, gpu_id=None)


def test_device_cuda_with_cuda():
    assert choose_placement(settings(device="cuda"), cuda_available=True, gpu_id=2) == Placement("cuda:2", torch.float16)


@pytest.mark.parametrize("cuda_available,device", [(True, "cuda:0"), (False, "cpu")])
def test_bfloat16_is_respected(cuda_available, device):
    placement = choose_placement(settings(dtype="bfloat16"), cuda_available=cuda_available, gpu_id=None)
    assert placement == Placement(device, torch.bfloat16)


def test_float32_on_gpu_is_respected():
    assert choose_placement(settings(dtype="float32"), cuda_available=True, gpu_id=0).dtype == torch.float32


@pytest.mark.parametrize("values,cuda_available", [
    ({"dtype": "float16"}, False),
    ({"dtype": "float16", "device": "cpu"}, True),
])
def test_float16_on_cpu_fails(values, cuda_available):
    with pytest.raises(RuntimeError, match="float16"):
        choose_placement(settings(**values), cuda_available=cuda_available, gpu_id=None)


# --- threads_per_worker --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores,workers,expected", [
    (2, 2, 1),
    (16, 2, 8),
    (2, 4, 1),
    (16, 3, 5),
    (8, 1, 8),
    (8, 0, 8),  # no worker registered yet still gets the cores
])
def test_threads_are_an_even_share(cores, workers, expected):
    assert threads_per_worker(cores, workers, override=0) == expected


def test_override_wins():
    assert threads_per_worker(2, 4, override=6) == 6
    assert threads_per_worker(16, 2, override=1) == 1


# --- WorkerRegistry ------------------------------------------------------------------------------------------


def test_registering_own_pid_counts_one(tmp_path):
    registry = WorkerRegistry(tmp_path / ".workers")
    registry.register(os.getpid())
    assert registry.live_count() == 1
    assert (tmp_path / ".workers" / str(os.getpid())).exists()


def test_two_live_processes_count_two(tmp_path):
    registry = WorkerRegistry(tmp_path / ".workers")
    registry.register(os.getpid())
    registry.register(os.getppid())
    assert registry.live_count() == 2


def test_registries_share_the_folder(tmp_path):
    WorkerRegistry(tmp_path / ".workers").register(os.getpid())
    other = WorkerRegistry(tmp_path / ".workers")
    other.register(os.getppid())
    assert other.live_count() == 2


def test_dead_pid_is_not_counted_and_is_removed(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: its pid is free
    registry = WorkerRegistry(tmp_path / ".workers")
    registry.register(os.getpid())
    registry.register(child.pid)
    registry.register(os.getppid())
    assert registry.live_count() == 2
    assert sorted(path.name for path in (tmp_path / ".workers").iterdir()) == sorted(
        [str(os.getpid()), str(os.getppid())])


def test_live_count_is_at_least_one(tmp_path):
    assert WorkerRegistry(tmp_path / ".workers").live_count() == 1
