"""Shared test set-up: no telemetry, one torch thread, small fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from collections.abc import Iterator

import pytest
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

# CI has 2 cores; one thread per process keeps parallel Ray actors from oversubscribing them.
torch.set_num_threads(1)


@pytest.fixture
def server_task_identity() -> Iterator[None]:
    """Flower stamps instruction Messages with the process's TaskIdentity (set by the runtime).

    A bare test process has none; act as the ServerApp task on the SuperLink node, and put
    back whatever was there before.
    """
    previous = {}
    for attr in ("run_id", "node_id", "task_id"):
        try:
            previous[attr] = getattr(TaskIdentity, attr)
        except RuntimeError:
            previous[attr] = None
    TaskIdentity.run_id = 7
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    yield
    for attr, value in previous.items():
        setattr(TaskIdentity, attr, value)


@pytest.fixture(scope="session")
def tiny_recorded_run(tmp_path_factory: pytest.TempPathFactory):
    """`tests.support.runs.TINY` run once per session, with every reply the server got."""
    from tests.support.runs import TINY, recorded_simulation

    return recorded_simulation(TINY, tmp_path_factory.mktemp("tiny-run"))
