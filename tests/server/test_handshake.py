"""Stage guards and the checks a hospital's DP releases pass before the server merges them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.data import Cohort
from client.tasks import handshake_statistics
from configs import wire
from configs.schema import load_schema
from configs.wire import HandshakeRequest
from models.numeric_moments import NUMERIC_KEY
from models.releases.base import ReleaseError
from models.releases.catalog import get_release
from models.releases.numeric import NumericMomentsRelease
from models.releases.sequence import SequenceMomentsRelease
from models.sequence.encoder import SequenceEncoder
from models.sequence.moments import SequenceMoments
from privacy.ledger import PrivacyLedger
from server.handshake import (
    HandshakeError,
    JoinError,
    collect_replies,
    count_cell_bound,
    dp_weight,
    run_handshake,
    wait_for_nodes,
)
from server.rounds import StageError, check_stage_trained
from simulation.cohort import generate_demo_cohort
from strategies.rounds import RoundLog
from tests.strategies.support import StaticGrid


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


def _checked(release, arrays: dict[str, np.ndarray]):
    """The release's value, or the reason it was refused."""
    try:
        return release.from_arrays(arrays, load_schema())
    except ReleaseError as err:
        return str(err)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"day_sd": np.ones(5)}, "day_sd units"),
        ({"day_by_day": np.zeros((6, 6))}, "day_by_day has shape (6, 6), expected (7, 7)"),
        ({"within": np.full((5, 5), np.inf)}, "within is not finite"),
    ],
)
def test_handshake_moments_in_other_units_or_shapes_are_refused_by_name(
    change: dict[str, np.ndarray], reason: str | None
) -> None:
    schema = load_schema()
    day_sd = SequenceEncoder.from_schema(schema).day_sd
    weeks = np.random.default_rng(0).uniform(0.3, 0.7, (20, 7, 5))
    moments = dataclasses.replace(SequenceMoments.of(weeks, day_sd=day_sd), **change)
    release = SequenceMomentsRelease()
    answer = _checked(release, release.to_arrays(moments))
    if reason is None:
        assert isinstance(answer, SequenceMoments)
    else:
        assert isinstance(answer, str) and reason in answer


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
    answer = _checked(NumericMomentsRelease(), record or {})
    if reason is None:
        assert isinstance(answer, np.ndarray) and answer.shape == (6, 6)
    else:
        assert answer == reason


# --- the whole handshake: real releases from three hospitals, malformed ones refused -------------


CAP = 100_000.0  # federation.max_hospital_weight in demo.toml


class HospitalsGrid(StaticGrid):
    """Each node answers the handshake as a ClientApp would, from its own demo cohort;
    `spoil[node]` changes that node's reply content before it is sent."""

    def __init__(self, spoil: dict[int, object]) -> None:
        super().__init__([1, 2, 3])
        self.spoil = spoil
        self.requests: list[HandshakeRequest] = []

    def send_and_receive(self, messages, *, timeout=None):
        return [self._answer(m) for m in messages]

    def _answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        request = HandshakeRequest.from_config(message.content.config_records[wire.CONFIG])
        self.requests.append(request)
        demo = generate_demo_cohort(80, seed=node)
        ledger = PrivacyLedger(max_epsilon=5.0, delta=1e-5)
        released = handshake_statistics(
            Cohort(demo.static, demo.timeseries),
            load_schema(),
            ledger=ledger,
            epsilon=1.0,
            seed=node,
            releases=request.releases,
        )
        content = RecordDict(
            {
                **{
                    name: ArrayRecord({k: Array(v) for k, v in get_release(name).to_arrays(value).items()})
                    for name, value in released.items()
                },
                wire.METRICS: MetricRecord({"epsilon": ledger.spent(), "delta": 1e-5, "max-epsilon": 5.0}),
                wire.NODE_INFO: ConfigRecord({"hospital": f"hospital-{node}"}),
            }
        )
        spoil = self.spoil.get(node)
        if spoil is not None:
            spoil(content)
        return Message(content, reply_to=message)


def _drop_histograms(content: RecordDict) -> None:
    del content["histograms"]


def _infinite_epsilon(content: RecordDict) -> None:
    content[wire.METRICS]["epsilon"] = float("inf")


def _text_cells(content: RecordDict) -> None:
    content["pairs"]["age|gender"] = Array(np.full((10, 3), "x"))


def _nan_cell(content: RecordDict) -> None:
    content["pairs"]["age|gender"] = Array(np.full_like(content["pairs"]["age|gender"].numpy(), np.nan))


@pytest.mark.usefixtures("server_task_identity")
def test_the_handshake_merges_every_release_the_plan_asked_for() -> None:
    grid = HospitalsGrid({})
    result = run_handshake(
        grid, [1, 2, 3], load_schema(), 10.0, releases=["sequence-moments"], max_hospital_weight=CAP
    )
    assert grid.requests[0].releases == ["histograms", "pairs", "sequence-moments"]
    assert sorted(result.statistics) == ["histograms", "pairs", "sequence-moments"]
    assert result.numeric is None and result.refusals == []
    assert result.moments.count == pytest.approx(240, abs=60)  # three hospitals' noisy counts
    assert set(result.reference) == set(load_schema().column_names)


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_drop_histograms, "release 'histograms' is missing"),
        (_infinite_epsilon, "metrics are malformed"),
        (_nan_cell, "pair table 'age|gender' is malformed"),
        (_text_cells, "release 'pairs' is malformed"),
    ],
    ids=["missing-record", "inf-epsilon", "nan-cell", "text-cells"],
)
def test_one_malformed_reply_is_a_refusal_and_the_others_go_on(spoil, reason: str) -> None:
    result = run_handshake(
        HospitalsGrid({2: spoil}), [1, 2, 3], load_schema(), 10.0, releases=[], max_hospital_weight=CAP
    )
    assert result.node_ids == [1, 3]
    assert [(r["hospital"], reason in r["reason"]) for r in result.refusals] == [("hospital-2", True)]


@pytest.mark.usefixtures("server_task_identity")
def test_a_handshake_nobody_passes_says_why() -> None:
    spoilers = dict.fromkeys((1, 2, 3), _drop_histograms)
    with pytest.raises(HandshakeError, match="hospital-1: release 'histograms' is missing"):
        run_handshake(
            HospitalsGrid(spoilers), [1, 2, 3], load_schema(), 10.0, releases=[], max_hospital_weight=CAP
        )


# --- the pure checks on hand-built replies: refusals, bounds, the DP weight ----------------------


def _replies(spoil: dict[int, object], extra: tuple[str, ...] = ()) -> tuple[list[Message], list[str]]:
    """Three hospitals' replies to one handshake request (as a ClientApp builds them), and the names."""
    names = ["histograms", "pairs", *extra]
    config = HandshakeRequest(schema_hash=load_schema().schema_hash(), releases=names).to_config()
    requests = [
        Message(RecordDict({wire.CONFIG: config}), dst_node_id=n, message_type=wire.HANDSHAKE)
        for n in (1, 2, 3)
    ]
    return HospitalsGrid(spoil).send_and_receive(requests), names


def _huge_cells(content: RecordDict) -> None:
    cells = content["histograms"]["age"].numpy().copy()
    cells[:2] = 1e308  # finite alone; summed with anything, inf (and NaN once normalised)
    content["histograms"]["age"] = Array(cells)


def _beyond_the_bound(content: RecordDict) -> None:
    cells = content["pairs"]["age|gender"].numpy().copy()
    cells[0, 0] = count_cell_bound(CAP) * 1.01
    content["pairs"]["age|gender"] = Array(cells)


def _metric(key: str, value: float | None):
    def spoil(content: RecordDict) -> None:
        if value is None:
            del content[wire.METRICS][key]
        else:
            content[wire.METRICS][key] = value

    return spoil


def _finite(result) -> bool:
    return all(
        np.isfinite(np.asarray(array, dtype=np.float64)).all()
        for name, value in result.statistics.items()
        for array in get_release(name).to_arrays(value).values()
    )


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_drop_histograms, "release 'histograms' is missing"),
        (_metric("epsilon", float("inf")), "'epsilon' is inf"),
        (_metric("max-epsilon", float("nan")), "'max-epsilon' is nan"),
        (_metric("delta", None), "'delta' is None"),
        (_metric("delta", 2.0), "delta 2 not in (0, 1)"),
        (_metric("max-epsilon", 1e9), "max-epsilon 1e+09 not in (0, 100]"),
        (_metric("epsilon", 7.0), "epsilon 7 not in [0, max-epsilon]"),
        (_huge_cells, "release 'histograms' part 'age' has values beyond"),
        (_beyond_the_bound, "release 'pairs' part 'age|gender' has values beyond"),
    ],
    ids=[
        "no-histograms",
        "inf-epsilon",
        "nan-max-epsilon",
        "no-delta",
        "delta-2",
        "max-eps-1e9",
        "eps-over-max",
        "two-1e308-cells",
        "cell-over-bound",
    ],
)
def test_a_spoiled_reply_is_refused_and_the_others_merge_finite(spoil, reason: str) -> None:
    replies, names = _replies({2: spoil}, extra=("sequence-moments",))
    result = collect_replies(replies, [1, 2, 3], names, load_schema(), max_hospital_weight=CAP)
    assert result.node_ids == [1, 3]
    (refusal,) = result.refusals
    assert (refusal["hospital"], refusal["node"]) == ("hospital-2", 2)
    assert reason in refusal["reason"]
    assert _finite(result)
    alone = collect_replies([replies[0], replies[2]], [1, 3], names, load_schema(), max_hospital_weight=CAP)
    for column, merged in result.reference.items():
        np.testing.assert_array_equal(merged, alone.reference[column])


@pytest.mark.usefixtures("server_task_identity")
def test_every_weight_is_the_dp_count_of_its_own_histograms_never_a_claimed_one() -> None:
    def claim_a_billion(content: RecordDict) -> None:
        content[wire.METRICS]["num-examples"] = 1e9

    replies, names = _replies({1: claim_a_billion})
    result = collect_replies(replies, [1, 2, 3], names, load_schema(), max_hospital_weight=CAP)
    schema = load_schema()
    for reply in replies:
        arrays = {k: v.numpy() for k, v in reply.content.array_records["histograms"].items()}
        own = get_release("histograms").from_arrays(arrays, schema)
        summary = result.hospitals[reply.metadata.src_node_id]
        assert summary.num_examples == dp_weight(own, CAP)
        assert summary.num_examples == pytest.approx(80, abs=20)  # 80 patients each, plus noise
    capped = collect_replies(replies, [1, 2, 3], names, schema, max_hospital_weight=50.0)
    assert [h.num_examples for h in capped.hospitals.values()] == [50.0] * 3


def test_the_dp_weight_averages_column_totals_and_is_clipped_to_one_and_the_cap() -> None:
    histograms = {"a": np.array([100.0, 60.0]), "b": np.array([150.0, 30.0, -10.0])}
    assert dp_weight(histograms, 1000.0) == 165.0  # (160 + 170) / 2
    assert dp_weight(histograms, 100.0) == 100.0
    assert dp_weight({"a": np.array([-5.0, 2.0])}, 100.0) == 1.0


@pytest.mark.usefixtures("server_task_identity")
def test_a_second_node_answering_as_a_taken_hospital_is_refused() -> None:
    def impostor(content: RecordDict) -> None:
        content[wire.NODE_INFO]["hospital"] = "hospital-1"

    replies, names = _replies({3: impostor})
    result = collect_replies(replies, [1, 2, 3], names, load_schema(), max_hospital_weight=CAP)
    assert len(result.node_ids) == 2 and {h.hospital for h in result.hospitals.values()} == {
        "hospital-1",
        "hospital-2",
    }
    assert [r["reason"] for r in result.refusals] == ["another node already answered as 'hospital-1'"]


# --- joining: never a silent wait ---------------------------------------------------------------


class _Arriving(StaticGrid):
    """Nodes that connect one per poll, up to `final`."""

    def __init__(self, final: int) -> None:
        super().__init__([])
        self.final, self.polls = final, 0

    def get_node_ids(self):
        self.polls += 1
        return list(range(1, min(self.polls, self.final) + 1))


def test_the_wait_ends_when_every_expected_node_is_there() -> None:
    assert wait_for_nodes(_Arriving(3), wanted=3, minimum=1, timeout_s=30.0) == [1, 2, 3]


def test_fewer_nodes_than_expected_go_on_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="server.handshake"):
        nodes = wait_for_nodes(_Arriving(2), wanted=3, minimum=2, timeout_s=1.2, report_every_s=0.4)
    assert nodes == [1, 2]
    assert "waiting for nodes: 2 of 3 expected connected" in caplog.text
    assert "expected 3 node(s) (federation.hospitals), 2 connected after 1s: going on with 2" in caplog.text


def test_too_few_nodes_stop_the_run_with_both_numbers() -> None:
    with pytest.raises(JoinError, match=r"expected 3 node\(s\).*1 connected after 1s.*at least 2 needed"):
        wait_for_nodes(_Arriving(1), wanted=3, minimum=2, timeout_s=1.0)
