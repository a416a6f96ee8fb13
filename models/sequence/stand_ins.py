"""Stand-in static profiles (encoded, no record in them) as .npy bytes on the wire, and their checks."""

from __future__ import annotations

import io

import numpy as np

from models.encoder import EncoderError


def encode_stand_ins(profiles: np.ndarray) -> bytes:
    """Encoded stand-in profiles (n, width) as .npy bytes, for a ConfigRecord (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(profiles, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def decode_stand_ins(data: bytes, width: int) -> np.ndarray:
    """The inverse of `encode_stand_ins`, refused unless it is a finite float (n >= 1, width) array."""
    try:
        profiles = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise EncoderError(f"stand-in profiles are not a readable .npy array: {err}") from err
    if profiles.dtype.kind != "f":
        raise EncoderError(f"stand-in profiles must be a float array, got {profiles.dtype}")
    return checked_stand_ins(profiles, width)


def checked_stand_ins(profiles: np.ndarray, width: int) -> np.ndarray:
    """Stand-in profiles as float32, refused unless finite with shape (n >= 1, width)."""
    profiles = np.asarray(profiles, dtype=np.float32)
    if profiles.ndim != 2 or profiles.shape[1] != width or not len(profiles):
        raise EncoderError(f"stand-in profiles must have shape (n >= 1, {width}), got {profiles.shape}")
    if not np.isfinite(profiles).all():
        raise EncoderError("stand-in profiles contain NaN or infinite values")
    return profiles
