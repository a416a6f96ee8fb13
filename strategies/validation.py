"""Sanity checks on a model update before it may enter the average."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict


def check_update(
    content: RecordDict, reference: ArrayRecord, *, weight_key: str = "num-examples"
) -> str | None:
    """None when `content` is a well-formed update of `reference`; else why it is not."""
    arrays = list(content.array_records.values())
    metrics = list(content.metric_records.values())
    if len(arrays) != 1:
        return f"expected one ArrayRecord, got {len(arrays)}"
    if len(metrics) != 1:
        return f"expected one MetricRecord, got {len(metrics)}"
    problem = _check_weight(metrics[0], weight_key)
    return problem or _check_arrays(arrays[0], reference)


def _check_weight(metrics: MetricRecord, weight_key: str) -> str | None:
    weight = metrics.get(weight_key)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        return f"'{weight_key}' is missing or not a number"
    if not math.isfinite(weight) or weight <= 0:
        return f"'{weight_key}' must be a positive finite number, got {weight}"
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
