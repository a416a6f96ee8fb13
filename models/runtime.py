"""Device choice and mixed precision: bf16 autocast on CUDA, fp32 master weights elsewhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(choice: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA GPU is visible to torch")
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {choice!r}")
    return torch.device(choice)


@contextlib.contextmanager
def autocast_for(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (weights stay fp32; bf16 needs no GradScaler, which DP forbids)."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
