"""The CUDA mixed-precision path on a CPU: `autocast_for` replaced by bf16 autocast on the CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def bf16_on_cpu(device: torch.device) -> Iterator[None]:
    """Stands in for `models.runtime.autocast_for`: bf16 forward passes, as on CUDA, here."""
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        yield
