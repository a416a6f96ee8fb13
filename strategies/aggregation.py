"""Aggregation helpers: mergeable metric sums and casting an aggregate back to the model's dtypes."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict


def sum_metricrecords(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Mergeable sums and counts: add every metric; epsilon is per hospital, so take the max.

    Args:
        records: reply contents, each holding one MetricRecord; list-valued metrics are skipped.
        weight_key: unused (the signature of Flower's `train_metrics_aggr_fn`); the weight is summed.
    """
    merged: dict[str, float] = {}
    for record in records:
        for key, value in next(iter(record.metric_records.values())).items():
            if isinstance(value, list):
                continue
            if key.startswith("epsilon"):
                merged[key] = max(merged.get(key, 0.0), float(value))
            else:
                merged[key] = merged.get(key, 0.0) + float(value)
    return MetricRecord(merged)


def cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """`arrays` in `reference`'s dtypes: averaging promotes integer buffers (BatchNorm counters) to float.

    Integer targets are rounded half to even first; 0-d arrays stay 0-d.
    """
    out = {}
    for name, value in arrays.items():
        want = reference[name].numpy().dtype
        data = value.numpy()
        if data.dtype != want:
            data = np.rint(data) if np.issubdtype(want, np.integer) else data
            data = data.astype(want)
        out[name] = Array(np.array(data, order="C"))  # np.array keeps 0-d arrays 0-d
    return ArrayRecord(out)
