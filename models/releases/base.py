"""What every DP release is: measured and noised at the hospital, checked and merged at the server."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from configs.schema import CohortSchema
from privacy.ledger import PrivacyLedger


class ReleaseError(ValueError):
    """A hospital's release cannot be used (missing part, wrong shape, non-finite value)."""


@dataclass(frozen=True)
class Members:
    """What a release measures: a hospital's member rows and, when the schema has them, their weeks."""

    static: pd.DataFrame
    weeks: np.ndarray | None = None  # (patients, days, channels) in [0, 1], rows aligned with static


class Release(Protocol):
    """One DP statistic: its Gaussian releases, the noisy measurement, its wire form and merge.

    `name` is the statistic's name in a run plan, a model's `releases`, and its record on the wire.
    """

    name: str

    def gaussian_releases(self, schema: CohortSchema) -> int:
        """How many Gaussian releases it makes (each at the handshake's noise multiplier)."""
        ...

    def measure(
        self,
        members: Members,
        schema: CohortSchema,
        *,
        ledger: PrivacyLedger,
        noise_multiplier: float,
        rng: np.random.Generator,
        released: dict[str, Any],
    ) -> Any:
        """Noised statistic, each release charged to `ledger`; `released`: earlier releases (DP)."""
        ...

    def to_arrays(self, value: Any) -> dict[str, np.ndarray]:
        """The wire and checkpoint form: named float arrays."""
        ...

    def from_arrays(self, arrays: dict[str, np.ndarray], schema: CohortSchema) -> Any:
        """Back from the wire; ReleaseError naming what is wrong."""
        ...

    def merge(self, parts: list[Any]) -> Any:
        """The hospitals' statistics summed (post-processing of DP outputs)."""
        ...


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as .npz bytes (a config entry); exact, no pickles."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_arrays`; anything else is a ReleaseError."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError) as err:
        raise ReleaseError(f"not an .npz of arrays: {err}") from None


def finite_array(arrays: dict[str, np.ndarray], key: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """arrays[key] as float64 of `shape` with finite values, else a ReleaseError naming it."""
    if key not in arrays:
        raise ReleaseError(f"{what} is missing")
    value = np.asarray(arrays[key])
    if value.shape != shape or not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all():
        raise ReleaseError(f"{what} is malformed (shape {value.shape}, need {shape})")
    return value.astype(np.float64)
