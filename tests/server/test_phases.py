"""Stage guards and answer checks of the server's run phases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from configs.schema import load_schema
from models.numeric_moments import NUMERIC_KEY
from models.timegan import SequenceEncoder, SequenceMoments
from server.phases import StageError, _moments_of, _numeric_of, check_stage_trained
from strategies.fedavg import RoundLog


def test_a_stage_without_any_aggregated_round_stops_the_run() -> None:
    refused = [
        RoundLog(r, rejected=[{"hospital": "hospital-1", "reason": "config: extra field 'x'"}])
        for r in (1, 2)
    ]
    with pytest.raises(
        StageError, match=r"timegan joint: no round aggregated.*hospital-1: config: extra field"
    ):
        check_stage_trained("timegan joint", refused)
    check_stage_trained("timegan joint", [*refused, RoundLog(3, aggregated=True)])  # one is enough
    check_stage_trained("timegan joint", [])  # a resumed stage with no rounds left


def _moments_reply(moments: SequenceMoments) -> Message:
    content = RecordDict({"moments": ConfigRecord({"json": moments.to_json()})})
    return Message(content, dst_node_id=1, message_type="query")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"day_sd": np.ones(5)}, "day_sd units"),
        ({"day_by_day": np.zeros((6, 6))}, "day_by_day has shape (6, 6), expected (7, 7)"),
        ({"within": np.full((5, 5), np.inf)}, "within is not finite"),
    ],
)
@pytest.mark.usefixtures("server_task_identity")
def test_handshake_moments_in_other_units_or_shapes_are_refused_by_name(
    change: dict[str, np.ndarray], reason: str | None
) -> None:
    schema = load_schema()
    day_sd = SequenceEncoder.from_schema(schema).day_sd
    weeks = np.random.default_rng(0).uniform(0.3, 0.7, (20, 7, 5))
    moments = dataclasses.replace(SequenceMoments.of(weeks, day_sd=day_sd), **change)
    answer = _moments_of(_moments_reply(moments), schema)
    if reason is None:
        assert isinstance(answer, SequenceMoments)
    else:
        assert isinstance(answer, str) and reason in answer


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (None, "numeric moments are missing"),
        ({NUMERIC_KEY: np.eye(6)}, None),
        ({NUMERIC_KEY: np.eye(4)}, "numeric moments have shape (4, 4), expected (6, 6)"),
        ({NUMERIC_KEY: np.full((6, 6), np.nan)}, "numeric moments are not finite"),
        ({"sums": np.eye(6)}, "numeric moments are missing"),
    ],
)
def test_handshake_numeric_moments_are_checked_before_merging(
    record: dict[str, np.ndarray] | None, reason: str | None
) -> None:
    content = RecordDict({})
    if record is not None:
        content["numeric"] = ArrayRecord({k: Array(v) for k, v in record.items()})
    answer = _numeric_of(Message(content, dst_node_id=1, message_type="query"), load_schema())
    if reason is None:
        assert isinstance(answer, np.ndarray) and answer.shape == (6, 6)
    else:
        assert answer == reason
