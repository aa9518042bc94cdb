"""A worker that would not fit in memory is refused with a message before it loads anything.

The estimate is checked against the real loaded pipeline; the reservations against live and dead processes
(a finished child's pid is a dead worker); the handler against a budget its tiny pipeline cannot fit.
"""

import os
import subprocess

import pytest
import torch

from handler.core.settings import HandlerSettings, SettingsError
from handler.model.memory_budget import (WORKING_MEMORY_BYTES, MemoryBudgetError, MemoryReservations,
                                         weight_bytes)

DEFAULTS = HandlerSettings()
PLENTY = lambda device: 10**15  # noqa: E731  (a host with room for anything)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_estimate_is_what_the_loaded_weights_take(tiny_pipeline_dir, tiny_pipeline, dtype):
    loaded = sum(tensor.numel() for module in tiny_pipeline.components.values() if isinstance(module, torch.nn.Module)
                 for tensor in module.state_dict().values())
    assert weight_bytes(tiny_pipeline_dir, DEFAULTS, dtype) == loaded * torch.tensor([], dtype=dtype).element_size()


def test_a_worker_over_the_budget_of_the_model_is_refused_naming_both_figures(tmp_path):
    reservations = MemoryReservations(tmp_path)
    weights = 2 * 10**9
    need = weights + WORKING_MEMORY_BYTES
    budget = HandlerSettings.from_mapping({"memory_budget_gb": 1.5 * need / 1e9})
    assert reservations.reserve(os.getppid(), "cpu", weights, budget, torch.float32, PLENTY) == need
    with pytest.raises(MemoryBudgetError, match=r"memory_budget_gb: this worker needs about 3\.0 GB .*1 other "
                                                r"worker\(s\) on cpu hold 3\.0 GB of its 4\.5 GB budget"):
        reservations.reserve(os.getpid(), "cpu", weights, budget, torch.float32, PLENTY)


def test_a_dead_workers_reservation_is_released(tmp_path):
    reservations = MemoryReservations(tmp_path)
    budget = HandlerSettings.from_mapping({"memory_budget_gb": 3.5})
    reservations.reserve(dead_pid(), "cpu", 2 * 10**9, budget, torch.float32, PLENTY)
    assert reservations.reserve(os.getpid(), "cpu", 2 * 10**9, budget, torch.float32, PLENTY) == 3 * 10**9


def test_a_worker_the_host_cannot_hold_is_refused(tmp_path):
    with pytest.raises(MemoryBudgetError, match=r"cpu has 2\.0 GB available; this worker is not started"):
        MemoryReservations(tmp_path).reserve(os.getpid(), "cpu", 2 * 10**9, DEFAULTS, torch.float32,
                                             lambda device: 2 * 10**9)


def test_workers_still_loading_count_against_the_hosts_memory_until_loaded(tmp_path):
    reservations = MemoryReservations(tmp_path)
    sibling, weights = os.getppid(), 2 * 10**9
    need = reservations.reserve(sibling, "cpu", weights, DEFAULTS, torch.float32, PLENTY)
    host = lambda device: need + need // 2  # noqa: E731  (room for one worker, measured before the sibling loaded)
    with pytest.raises(MemoryBudgetError, match="reserved by workers still loading"):
        reservations.reserve(os.getpid(), "cpu", weights, DEFAULTS, torch.float32, host)
    reservations.mark_loaded(sibling)  # its memory is now gone from what the host reports available
    assert reservations.reserve(os.getpid(), "cpu", weights, DEFAULTS, torch.float32, host) == need


def test_a_negative_budget_is_refused():
    with pytest.raises(SettingsError, match="memory_budget_gb must be 0"):
        HandlerSettings.from_mapping({"memory_budget_gb": -1})


def test_the_handler_refuses_to_load_over_its_budget(handler_factory):
    with pytest.raises(MemoryBudgetError, match="memory_budget_gb: this worker needs about"):
        handler_factory({"memory_budget_gb": 0.001})
