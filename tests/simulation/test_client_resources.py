"""Ray's resources per simulated client: CPUs from the threads, a GPU share only when one may be used."""

from __future__ import annotations

from typing import Literal

import pytest

from configs.settings import RuntimeSettings
from simulation.runner import client_resources

Device = Literal["auto", "cpu", "cuda"]


def _runtime(device: Device, threads: int = 1) -> RuntimeSettings:
    return RuntimeSettings(device=device, threads_per_client=threads)


@pytest.mark.parametrize(
    ("device", "gpus", "expected_gpu"),
    [
        ("auto", 0, 0.0),  # no GPU: nothing to share
        ("cpu", 0, 0.0),
        ("cuda", 0, 0.0),  # the client then refuses clearly (models.runtime.resolve_device)
        ("auto", 1, 0.3333),  # 3 hospitals share the GPU, rounded down to Ray's 1e-4 grain
        ("cuda", 1, 0.3333),
        ("cpu", 1, 0.0),  # the run keeps to the CPU: no client holds a GPU share
    ],
)
def test_gpu_share_follows_the_device_and_the_visible_gpus(
    device: Device, gpus: int, expected_gpu: float
) -> None:
    resources = client_resources(_runtime(device), 3, cpus=16, gpus=gpus)
    assert resources == {"num_cpus": 1.0, "num_gpus": expected_gpu}


@pytest.mark.parametrize(
    ("hospitals", "cpus", "gpus", "expected_gpu"),
    [
        (3, 2, 1, 0.5),  # a 2-core machine runs 2 clients at once: each gets half the GPU
        (1, 16, 1, 1.0),
        (100, 16, 1, 0.0625),  # the CPUs, not the hospitals, bound how many share it
        (3, 16, 2, 0.5),  # 2 clients on one GPU, 1 on the other
        (3, 16, 4, 1.0),
    ],
)
def test_gpu_share_lets_every_concurrent_client_fit(
    hospitals: int, cpus: int, gpus: int, expected_gpu: float
) -> None:
    resources = client_resources(_runtime("auto"), hospitals, cpus=cpus, gpus=gpus)
    assert resources["num_gpus"] == expected_gpu
    concurrent = min(hospitals, cpus)
    # Flower sizes its actor pool as int(GPUs / share): the clients that can run must all fit.
    assert gpus * int(1 / resources["num_gpus"]) >= concurrent


@pytest.mark.parametrize(("threads", "cpus", "expected_cpus"), [(1, 2, 1.0), (2, 2, 2.0), (8, 2, 2.0)])
def test_cpus_are_the_threads_capped_at_the_machine(threads: int, cpus: int, expected_cpus: float) -> None:
    for gpus in (0, 1):
        assert (
            client_resources(_runtime("auto", threads), 3, cpus=cpus, gpus=gpus)["num_cpus"] == expected_cpus
        )


def test_threads_leave_room_for_fewer_clients_per_gpu() -> None:
    # 4 threads each on 8 cores: 2 clients at once, so each may hold half the GPU.
    assert client_resources(_runtime("auto", 4), 3, cpus=8, gpus=1) == {"num_cpus": 4.0, "num_gpus": 0.5}
