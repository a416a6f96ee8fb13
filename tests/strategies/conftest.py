"""Fixtures for the strategy tests: every test here acts as the ServerApp task."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _as_server_task(server_task_identity: None) -> None:
    """Every test here builds instruction Messages (see tests/conftest's `server_task_identity`)."""
