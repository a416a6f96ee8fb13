"""Device choice and mixed precision: bf16 autocast on CUDA, fp32 master weights elsewhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

# Off only inside `full_precision()`: a context variable, so a benchmark's fp32 run in one thread
# cannot change what another thread's training does.
_BF16_ON_CUDA: ContextVar[bool] = ContextVar("mindfed_bf16_on_cuda", default=True)


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
    if device.type == "cuda" and _BF16_ON_CUDA.get():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Within the block `autocast_for` leaves CUDA in fp32 (the bf16-vs-fp32 benchmark, bf16 suspects)."""
    token = _BF16_ON_CUDA.set(False)
    try:
        yield
    finally:
        _BF16_ON_CUDA.reset(token)
