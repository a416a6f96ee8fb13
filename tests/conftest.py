"""Shared test set-up: no telemetry, one torch thread, small fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch

# CI has 2 cores; one thread per process keeps parallel Ray actors from oversubscribing them.
torch.set_num_threads(1)
