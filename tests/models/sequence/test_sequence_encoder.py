"""Tests for models.sequence.encoder: the daily table to scaled weeks and back, by the schema alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from configs.schema import ChannelSpec, CohortSchema, SequenceSpec
from models.encoder import EncoderError
from models.sequence.encoder import DEFAULT_DAY_SD, SequenceEncoder
from tests.models.sequence.support import N, _other_schema, _random_long_frame

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def test_sequence_encoder_round_trip(schema: CohortSchema, cohort, weeks: np.ndarray) -> None:
    seq = SequenceEncoder.from_schema(schema)
    assert weeks.shape == (N, 7, 5) and weeks.dtype == np.float32
    assert weeks.min() >= 0.0 and weeks.max() <= 1.0
    back = seq.inverse_transform(weeks, cohort.static["patient_id"])
    original = cohort.timeseries
    assert list(back.columns) == list(original.columns)
    assert back["patient_id"].tolist() == original["patient_id"].tolist()
    assert back["day"].tolist() == original["day"].tolist()
    for channel in schema.sequence.channels:
        span = channel.max - channel.min
        np.testing.assert_allclose(back[channel.name], original[channel.name], rtol=0, atol=1e-6 * span)


def test_sequence_encoder_follows_the_given_id_order(schema: CohortSchema, cohort, weeks: np.ndarray) -> None:
    seq = SequenceEncoder.from_schema(schema)
    shuffled = cohort.timeseries.sample(frac=1.0, random_state=0)
    ids = cohort.static["patient_id"].tolist()[::-1]
    np.testing.assert_array_equal(seq.transform(shuffled, ids), weeks[::-1])


@pytest.mark.parametrize("damage", ["missing day", "repeated day", "unknown patient", "day out of range"])
def test_sequence_encoder_refuses_incomplete_weeks(schema: CohortSchema, cohort, damage: str) -> None:
    seq = SequenceEncoder.from_schema(schema)
    frame = cohort.timeseries.copy()
    ids = cohort.static["patient_id"]
    if damage == "missing day":
        frame = frame.iloc[1:]
    elif damage == "repeated day":
        frame.loc[1, "day"] = 1
    elif damage == "unknown patient":
        frame.loc[0, "patient_id"] = "nobody"
    else:
        frame.loc[0, "day"] = 8
    with pytest.raises(EncoderError):
        seq.transform(frame, ids)


def test_sequence_encoder_uses_the_schema_not_hard_coded_channels() -> None:
    other = _other_schema()
    seq = SequenceEncoder.from_schema(other)
    frame = _random_long_frame(other, 12, np.random.default_rng(3))
    array = seq.transform(frame)
    assert array.shape == (12, 5, 3)
    back = seq.inverse_transform(array, frame["pid"].unique())
    assert list(back.columns) == ["pid", "visit", "temp", "mood", "calls"]
    pd.testing.assert_frame_equal(back, frame, check_dtype=False, atol=1e-4, rtol=0)


def test_inverse_transform_clips_to_the_declared_ranges() -> None:
    seq = SequenceEncoder.from_schema(_other_schema())
    array = np.full((2, 5, 3), 1.5, dtype=np.float32)
    array[1] = -0.5
    back = seq.inverse_transform(array)
    assert back["pid"].tolist()[:6] == ["S000001"] * 5 + ["S000002"]
    assert (back.loc[:4, ["temp", "mood", "calls"]].to_numpy() == [42.0, 5.0, 300.0]).all()
    assert (back.loc[5:, ["temp", "mood", "calls"]].to_numpy() == [35.0, -5.0, 0.0]).all()


def test_log_scaled_channel_round_trips_and_respects_its_range() -> None:
    spec = SequenceSpec(
        length=3,
        channels=(
            ChannelSpec(name="steps", min=0.0, max=40000.0, scale="log"),
            ChannelSpec(name="sleep", min=0.0, max=14.0),
        ),
    )
    seq = SequenceEncoder(spec, id_column="pid")
    raw = np.array([[0.0, 0.0], [200.0, 7.0], [7500.0, 3.5], [40000.0, 14.0], [90000.0, -1.0]])
    unit = seq.to_unit(raw)
    assert unit.min() >= 0.0 and unit.max() <= 1.0
    # log1p(value - min) / log1p(max - min): 7500 steps sit at 0.84, not at 0.19 as on a linear scale
    assert unit[2, 0] == pytest.approx(np.log1p(7500.0) / np.log1p(40000.0))
    assert unit[2, 1] == pytest.approx(0.25)
    back = seq.from_unit(unit)
    np.testing.assert_allclose(back[:4], raw[:4], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(back[4], [40000.0, 0.0])  # outside the range: clipped to it
    assert (seq.from_unit(np.array([[1.7, -0.4]])) == [[40000.0, 0.0]]).all()


def test_day_sd_is_converted_to_the_unit_scale() -> None:
    """A linear channel's day_sd is in its unit, a log channel's a fraction; none: the default."""
    spec = SequenceSpec(
        length=3,
        channels=(
            ChannelSpec(name="steps", min=0.0, max=40000.0, scale="log", day_sd=0.3),
            ChannelSpec(name="sleep", min=0.0, max=14.0, day_sd=1.0),
            ChannelSpec(name="mood", min=-5.0, max=5.0),
        ),
    )
    seq = SequenceEncoder(spec, id_column="pid")
    np.testing.assert_allclose(seq.day_sd, [0.3 / np.log1p(40000.0), 1.0 / 14.0, DEFAULT_DAY_SD])
    # a 30% change of a typical step count moves its unit value by about day_sd
    moved = np.diff(seq.to_unit(np.array([[7500.0, 7.0, 0.0], [7500.0 * 1.3, 7.0, 0.0]]))[:, 0])[0]
    assert moved == pytest.approx(np.log(1.3) / np.log1p(40000.0), rel=1e-3)


@pytest.mark.parametrize(
    ("channel", "match"),
    [
        ({"scale": "log", "day_sd": 1.5}, "a fraction"),
        ({"day_sd": 20.0}, "exceeds the range"),
        ({"day_sd": -1.0}, "greater than 0"),
    ],
)
def test_implausible_day_sd_is_refused_by_name(channel: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChannelSpec(name="x", min=0.0, max=14.0, **channel)


def test_schema_without_a_sequence_is_refused(schema: CohortSchema) -> None:
    with pytest.raises(EncoderError, match="sequence"):
        SequenceEncoder.from_schema(schema.model_copy(update={"sequence": None}))
