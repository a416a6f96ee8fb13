"""Sanity checks on a model update before it may enter the average."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

# An honest local round moves a model by a small fraction of its norm (a few epochs of clipped,
# noised DP-SGD steps at a small learning rate), so 10 whole model norms never refuses one while
# it still stops a node from swamping or zeroing the average (1e30-scale weights). The floor of 1
# on ||global|| keeps the bound meaningful for a model whose weights are all near zero.
DEFAULT_MAX_UPDATE_NORM_RATIO = 10.0


def check_update(
    content: RecordDict, reference: ArrayRecord, *, max_norm_ratio: float = DEFAULT_MAX_UPDATE_NORM_RATIO
) -> str | None:
    """None when `content` is a well-formed, bounded update of `reference`; else why it is not."""
    arrays = list(content.array_records.values())
    metrics = list(content.metric_records.values())
    if len(arrays) != 1:
        return f"expected one ArrayRecord, got {len(arrays)}"
    if len(metrics) != 1:
        return f"expected one MetricRecord, got {len(metrics)}"
    problem = _check_metrics(metrics[0]) or _check_arrays(arrays[0], reference)
    if problem is not None:
        return problem
    ratio = update_norm_ratio(arrays[0], reference)
    if not ratio <= max_norm_ratio:
        return (
            f"update norm ratio {ratio:.4g} (||update - global|| / max(||global||, 1)) exceeds "
            f"{max_norm_ratio:g} (federation.max_update_norm_ratio)"
        )
    return None


def update_norm_ratio(update: ArrayRecord, reference: ArrayRecord) -> float:
    """||update - reference||_2 / max(||reference||_2, 1) over every array (names already checked)."""
    distance = scale = 0.0
    # float64 squares of float32 weights cannot overflow; float64 ones beyond 1e154 may: inf, refused
    with np.errstate(over="ignore"):
        for name, expected in reference.items():
            want = expected.numpy().astype(np.float64)
            distance += float(np.sum(np.square(update[name].numpy().astype(np.float64) - want)))
            scale += float(np.sum(np.square(want)))
    return math.sqrt(distance) / max(math.sqrt(scale), 1.0)


def _check_metrics(metrics: MetricRecord) -> str | None:
    # The update's weight is the server's (the handshake's DP count): any weight here is ignored.
    # Scalars are summed into the round's metrics and epsilon into the report: they must be finite.
    for key, value in metrics.items():
        if isinstance(value, int | float) and not math.isfinite(value):
            return f"metric '{key}' must be a finite number, got {value}"
    return None


def _check_arrays(update: ArrayRecord, reference: ArrayRecord) -> str | None:
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"array names differ (missing {missing[:5]}, unexpected {extra[:5]})"
    for name, expected in reference.items():
        try:
            value = update[name].numpy()
        except Exception as err:  # malformed bytes must not crash the round
            return f"array '{name}' cannot be decoded: {err}"
        want = expected.numpy()
        if value.shape != want.shape:
            return f"array '{name}' has shape {value.shape}, expected {want.shape}"
        if value.dtype != want.dtype:
            return f"array '{name}' has dtype {value.dtype}, expected {want.dtype}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"array '{name}' contains NaN or infinite values"
    return None
