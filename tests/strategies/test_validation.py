"""Tests for strategies.validation.check_update and the aggregation helpers in strategies.aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from strategies.aggregation import cast_like, sum_metricrecords
from strategies.validation import DEFAULT_MAX_UPDATE_NORM_RATIO, check_update, update_norm_ratio
from tests.strategies.support import BAD_CASES, arrays_of, bad_content, content, metrics, record, reference

# --- sum_metricrecords ----------------------------------------------------------------------


def test_sum_metricrecords_sums_counts_and_takes_max_epsilon() -> None:
    records = [
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": 100,
                        "steps": 4.0,
                        "epsilon": 0.7,
                        "epsilon-statistics": 0.2,
                        "curve": [1.0, 2.0],
                    }
                )
            }
        ),
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": 300,
                        "steps": 6.0,
                        "epsilon": 1.9,
                        "epsilon-statistics": 0.1,
                        "curve": [3.0, 4.0],
                    }
                )
            }
        ),
        RecordDict({"metrics": MetricRecord({"num-examples": 50, "steps": 1.0, "epsilon": 1.2})}),
    ]
    merged = sum_metricrecords(records, "num-examples")
    assert dict(merged) == {
        "num-examples": 450.0,
        "steps": 11.0,
        "epsilon": 1.9,
        "epsilon-statistics": 0.2,
    }


def test_sum_metricrecords_of_nothing_is_empty() -> None:
    assert dict(sum_metricrecords([], "num-examples")) == {}


# --- cast_like ------------------------------------------------------------------------------


def test_cast_like_restores_dtypes_rounds_integers_and_keeps_0d() -> None:
    averaged = ArrayRecord(
        {
            "w": Array(np.full((2, 2), 0.5, dtype=np.float64)),
            "b": Array(np.array([1.0, 2.0, 3.0])),
            "t": Array(np.array(1.25)),
            "count": Array(np.array(2.5)),
            "idx": Array(np.array([0.5, 1.5, 2.4])),
        }
    )
    cast = cast_like(averaged, reference())
    assert {k: (v.numpy().dtype, v.numpy().shape) for k, v in cast.items()} == {
        k: (v.numpy().dtype, v.numpy().shape) for k, v in reference().items()
    }
    assert int(cast["count"].numpy()) == 2  # half to even
    assert cast["idx"].numpy().tolist() == [0, 2, 2]
    assert float(cast["t"].numpy()) == 1.25


# --- check_update ---------------------------------------------------------------------------


def _update(arrays: dict[str, np.ndarray] | None = None, weights: dict | None = None) -> RecordDict:
    return content(
        arrays_of(1) if arrays is None else arrays,
        metrics(10) if weights is None else weights,
        "hospital-1",
    )


def test_check_update_accepts_a_well_formed_update() -> None:
    assert check_update(_update(), reference()) is None
    assert check_update(_update(weights=metrics(2.5)), reference()) is None


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_check_update_names_the_problem(case: str) -> None:
    problem = check_update(bad_content(case), reference())
    assert problem is not None
    assert BAD_CASES[case] in problem


def test_check_update_names_the_offending_array() -> None:
    arrays = arrays_of(1)
    arrays["b"] = np.ones(4)
    assert check_update(_update(arrays=arrays), reference()) == "array 'b' has shape (4,), expected (3,)"
    arrays = arrays_of(1)
    arrays["w"] = arrays["w"].astype(np.float16)
    problem = check_update(_update(arrays=arrays), reference())
    assert problem == "array 'w' has dtype float16, expected float32"


def test_check_update_reports_missing_and_unexpected_names() -> None:
    arrays = arrays_of(1)
    del arrays["w"]
    arrays["v"] = np.zeros((2, 2), dtype=np.float32)
    problem = check_update(_update(arrays=arrays), reference())
    assert problem is not None
    assert "missing ['w']" in problem
    assert "unexpected ['v']" in problem


def test_check_update_requires_records() -> None:
    assert "ArrayRecord" in check_update(content(None, metrics(1), None), reference())
    assert "MetricRecord" in check_update(content(arrays_of(1), None, None), reference())


def test_check_update_needs_no_weight_in_the_reply() -> None:
    # the server weighs by the handshake's DP count: a reply's count is neither needed nor checked
    assert check_update(_update(weights={"epsilon": 0.1}), reference()) is None
    assert check_update(_update(weights={"num-examples": 0, "epsilon": 0.1}), reference()) is None
    assert check_update(_update(weights={"num-examples": [1, 2], "epsilon": 0.1}), reference()) is None
    problem = check_update(_update(weights={"num-examples": float("inf")}), reference())
    assert problem == "metric 'num-examples' must be a finite number, got inf"


def test_the_update_norm_ratio_is_the_distance_over_the_global_norm() -> None:
    # reference() is arrays_of(3) and every array is linear in the scale: the ratio is exact
    assert update_norm_ratio(record(arrays_of(6)), reference()) == pytest.approx(1.0, rel=1e-12)
    assert update_norm_ratio(record(arrays_of(3)), reference()) == 0.0
    zeros = record({k: np.zeros_like(v) for k, v in arrays_of(1).items()})
    # ||global|| below 1 counts as 1, so a zero model still has a bound
    assert update_norm_ratio(record(arrays_of(1)), zeros) == pytest.approx(
        np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in arrays_of(1).values()))
    )


def test_check_update_refuses_an_update_beyond_the_norm_bound_only() -> None:
    assert DEFAULT_MAX_UPDATE_NORM_RATIO == 10.0
    update = _update(arrays=arrays_of(4))  # ratio 1/3
    assert check_update(update, reference(), max_norm_ratio=0.34) is None
    problem = check_update(update, reference(), max_norm_ratio=0.2)
    assert problem == (
        "update norm ratio 0.3333 (||update - global|| / max(||global||, 1)) exceeds 0.2 "
        "(federation.max_update_norm_ratio)"
    )


def test_check_update_refuses_extreme_integer_arrays_by_their_norm_without_overflow() -> None:
    arrays = arrays_of(1)
    arrays["idx"] = np.array([np.iinfo(np.int64).max, 0, -1], dtype=np.int64)
    assert check_update(_update(arrays=arrays), reference(), max_norm_ratio=float("inf")) is None
    assert "update norm ratio 3.555e+17" in check_update(_update(arrays=arrays), reference())
    arrays = arrays_of(1)
    arrays["b"] = np.array([1e200, -1e200, 1e200])  # squares overflow float64: refused, no warning
    assert "update norm ratio inf" in check_update(_update(arrays=arrays), reference())
