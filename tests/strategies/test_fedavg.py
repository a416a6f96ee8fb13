"""Tests for strategies.fedavg (validated, weighted FedAvg) and strategies.validation.check_update."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from strategies.fedavg import NODE_INFO_KEY, QuorumError, ValidatedFedAvg, sum_metricrecords
from strategies.validation import check_update

GOOD_NODES = (11, 22)
BAD_NODE = 33


# --- test doubles ---------------------------------------------------------------------------


class StaticGrid(Grid):
    """A Grid whose only working surface is the set of connected node ids.

    FedAvg.configure_train only asks the Grid for node ids; anything else would mean the
    strategy tried to talk to nodes, which these unit tests do not allow.
    """

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._node_ids = list(node_ids)

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


@pytest.fixture(autouse=True)
def _as_server_task(server_task_identity: None) -> None:
    """Every test here builds instruction Messages (see conftest's `server_task_identity`)."""


# --- helpers --------------------------------------------------------------------------------


def _reference() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.zeros((2, 2), dtype=np.float32)),
            "b": Array(np.zeros(3, dtype=np.float64)),
            "t": Array(np.array(0.0, dtype=np.float32)),  # 0-d float
            "count": Array(np.array(0, dtype=np.int64)),  # 0-d integer buffer (BatchNorm-like)
            "idx": Array(np.zeros(3, dtype=np.int64)),
        }
    )


def _arrays(scale: float) -> dict[str, np.ndarray]:
    """A well-formed update whose values are dyadic (exact in binary) multiples of `scale`."""
    return {
        "w": (np.arange(4, dtype=np.float32).reshape(2, 2) + 1) * np.float32(scale),
        "b": np.array([0.5, -1.25, 3.0]) * scale,
        "t": np.array(2.0 * scale, dtype=np.float32),
        "count": np.array(int(4 * scale), dtype=np.int64),
        "idx": np.array([1, 2, 3], dtype=np.int64) * int(scale),
    }


def _content(
    arrays: dict[str, np.ndarray] | None,
    metrics: dict | None,
    hospital: str | None,
    *,
    extra_records: dict | None = None,
) -> RecordDict:
    records: dict = {}
    if arrays is not None:
        records["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if metrics is not None:
        records["metrics"] = MetricRecord(metrics)
    if hospital is not None:
        records[NODE_INFO_KEY] = ConfigRecord({"hospital": hospital})
    records.update(extra_records or {})
    return RecordDict(records)


def _metrics(weight: int | float, epsilon: float = 0.5) -> dict:
    return {"num-examples": weight, "epsilon": epsilon, "steps": 10.0}


def _start(
    nodes: Iterable[int] = (*GOOD_NODES, BAD_NODE), **kwargs
) -> tuple[ValidatedFedAvg, dict[int, Message], ArrayRecord]:
    nodes = list(nodes)
    kwargs.setdefault("min_train_nodes", len(nodes))
    kwargs.setdefault("min_available_nodes", len(nodes))
    strategy = ValidatedFedAvg(action="generator", **kwargs)
    reference = _reference()
    instructions = strategy.configure_train(1, reference, ConfigRecord({"seed": 7}), StaticGrid(nodes))
    return strategy, {m.metadata.dst_node_id: m for m in instructions}, reference


def _reply(instruction: Message, content: RecordDict) -> Message:
    """The node's answer, built the way a ClientApp builds it (src node id = the node's)."""
    return Message(content, reply_to=instruction)


def _good_replies(instructions: dict[int, Message]) -> list[Message]:
    # weights 1 and 3 on updates of scale 1 and 5: the average is (1*x1 + 3*x2) / 4.
    return [
        _reply(instructions[11], _content(_arrays(1), _metrics(1, epsilon=0.4), "hospital-1")),
        _reply(instructions[22], _content(_arrays(5), _metrics(3, epsilon=1.1), "hospital-2")),
    ]


def _expected_average() -> dict[str, np.ndarray]:
    x1, x2 = _arrays(1), _arrays(5)
    return {k: (1 * x1[k].astype(np.float64) + 3 * x2[k].astype(np.float64)) / 4 for k in x1}


def _assert_matches_good_average(arrays: ArrayRecord | None, reference: ArrayRecord) -> None:
    assert arrays is not None
    assert list(arrays.keys()) == list(reference.keys())
    expected = _expected_average()
    for name, ref in reference.items():
        got, want = arrays[name].numpy(), ref.numpy()
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, np.rint(expected[name]).astype(want.dtype))
        else:
            np.testing.assert_array_equal(got, expected[name].astype(want.dtype))


# --- configure_train ------------------------------------------------------------------------


def test_configure_train_sends_train_action_messages_to_every_node() -> None:
    strategy, instructions, reference = _start()
    assert sorted(instructions) == sorted((*GOOD_NODES, BAD_NODE))
    for node, message in instructions.items():
        assert message.metadata.message_type == "train.generator"
        assert message.metadata.dst_node_id == node
        assert message.metadata.src_node_id == SUPERLINK_NODE_ID
        assert message.content.array_records["arrays"] is reference
        config = message.content.config_records["config"]
        assert config["server-round"] == 1
        assert config["seed"] == 7
    assert strategy.rounds == []


def test_configure_train_uses_the_strategy_action() -> None:
    strategy = ValidatedFedAvg(action="risk_model", min_train_nodes=1, min_available_nodes=1)
    messages = list(strategy.configure_train(3, _reference(), ConfigRecord(), StaticGrid([5])))
    assert [m.metadata.message_type for m in messages] == ["train.risk_model"]


def test_replies_carry_the_answering_nodes_id() -> None:
    _, instructions, _ = _start()
    reply = _reply(instructions[22], _content(_arrays(1), _metrics(1), "hospital-2"))
    assert reply.metadata.src_node_id == 22
    assert reply.metadata.message_type == "train.generator"


# --- aggregate_train: arithmetic ------------------------------------------------------------


def test_weighted_average_is_exact_and_keeps_dtypes_and_0d_shapes() -> None:
    strategy, instructions, reference = _start(nodes=GOOD_NODES)
    arrays, metrics = strategy.aggregate_train(1, _good_replies(instructions))

    _assert_matches_good_average(arrays, reference)
    assert arrays["w"].numpy().tolist() == [[4.0, 8.0], [12.0, 16.0]]  # (1*[1..4] + 3*[5..20]) / 4
    assert arrays["count"].numpy().shape == ()
    assert arrays["count"].numpy().dtype == np.int64
    assert int(arrays["count"].numpy()) == 16  # (1*4 + 3*20) / 4
    assert arrays["t"].numpy().shape == ()
    assert float(arrays["t"].numpy()) == 8.0  # (1*2 + 3*10) / 4
    assert arrays["idx"].numpy().tolist() == [4, 8, 12]

    assert metrics is not None
    assert metrics["num-examples"] == 4.0
    assert metrics["epsilon"] == 1.1  # max over hospitals, not an average
    assert metrics["steps"] == 20.0

    log = strategy.rounds[-1]
    assert log.server_round == 1
    assert log.aggregated is True
    assert log.rejected == []
    assert [(a["hospital"], a["node"], a["num-examples"]) for a in log.accepted] == [
        ("hospital-1", 11, 1),
        ("hospital-2", 22, 3),
    ]


def test_weighted_average_with_random_float_values() -> None:
    rng = np.random.default_rng(3)
    nodes = (1, 2, 3)
    weights = (2, 5, 13)
    strategy, instructions, reference = _start(nodes=nodes)
    updates = [
        {
            "w": rng.normal(size=(2, 2)).astype(np.float32),
            "b": rng.normal(size=3),
            "t": np.array(rng.normal(), dtype=np.float32),
            "count": np.array(rng.integers(0, 100), dtype=np.int64),
            "idx": rng.integers(0, 100, size=3).astype(np.int64),
        }
        for _ in nodes
    ]
    replies = [
        _reply(instructions[node], _content(values, _metrics(weight), f"h{node}"))
        for node, weight, values in zip(nodes, weights, updates, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    total = sum(weights)
    for name, ref in reference.items():
        want = sum(w * u[name].astype(np.float64) for w, u in zip(weights, updates, strict=True)) / total
        got = arrays[name].numpy()
        assert got.dtype == ref.numpy().dtype
        assert got.shape == ref.numpy().shape
        if np.issubdtype(got.dtype, np.integer):
            np.testing.assert_array_equal(got, np.rint(want).astype(got.dtype))
        elif got.dtype == np.float32:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_integer_buffers_are_rounded_back_to_integers() -> None:
    strategy, instructions, _ = _start(nodes=GOOD_NODES)
    low, high = _arrays(1), _arrays(1)
    low["idx"] = np.array([0, 0, 1], dtype=np.int64)
    high["idx"] = np.array([1, 2, 1], dtype=np.int64)
    replies = [
        _reply(instructions[11], _content(low, _metrics(1), "hospital-1")),
        _reply(instructions[22], _content(high, _metrics(3), "hospital-2")),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    idx = arrays["idx"].numpy()
    assert idx.dtype == np.int64
    assert idx.tolist() == [1, 2, 1]  # 0.75 -> 1, 1.5 -> 2 (round half to even), 1 -> 1


# --- aggregate_train: rejections ------------------------------------------------------------


def _bad_content(case: str) -> RecordDict:
    arrays, metrics = _arrays(2), _metrics(7)
    extra_records = None
    if case == "wrong shape":
        arrays["w"] = np.ones((2, 3), dtype=np.float32)
    elif case == "wrong dtype":
        arrays["w"] = np.ones((2, 2), dtype=np.float64)
    elif case == "wrong integer dtype":
        arrays["idx"] = np.ones(3, dtype=np.int32)
    elif case == "NaN":
        arrays["b"] = np.array([0.0, np.nan, 1.0])
    elif case == "infinite":
        arrays["t"] = np.array(np.inf, dtype=np.float32)
    elif case == "missing array":
        del arrays["idx"]
    elif case == "extra array":
        arrays["sneaky"] = np.zeros(2, dtype=np.float32)
    elif case == "missing num-examples":
        del metrics["num-examples"]
    elif case == "zero num-examples":
        metrics["num-examples"] = 0
    elif case == "negative num-examples":
        metrics["num-examples"] = -5
    elif case == "NaN num-examples":
        metrics["num-examples"] = float("nan")
    elif case == "two ArrayRecords":
        extra_records = {"more-arrays": ArrayRecord({k: Array(v) for k, v in _arrays(1).items()})}
    elif case == "two MetricRecords":
        extra_records = {"more-metrics": MetricRecord(_metrics(1))}
    elif case == "undecodable bytes":
        content = _content(arrays, metrics, "hospital-bad")
        content.array_records["arrays"]["b"] = Array(
            dtype="float64", shape=(3,), stype="numpy.ndarray", data=b"not an npy payload"
        )
        return content
    else:  # pragma: no cover
        raise AssertionError(case)
    return _content(arrays, metrics, "hospital-bad", extra_records=extra_records)


BAD_CASES = {
    "wrong shape": "shape",
    "wrong dtype": "dtype",
    "wrong integer dtype": "dtype",
    "NaN": "NaN",
    "infinite": "infinite",
    "missing array": "names differ",
    "extra array": "names differ",
    "missing num-examples": "num-examples",
    "zero num-examples": "num-examples",
    "negative num-examples": "num-examples",
    "NaN num-examples": "num-examples",
    "two ArrayRecords": "ArrayRecord",
    "two MetricRecords": "MetricRecord",
    "undecodable bytes": "cannot be decoded",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_malformed_update_is_rejected_logged_and_left_out(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    strategy, instructions, reference = _start()
    bad = _reply(instructions[BAD_NODE], _bad_content(case))
    good = _good_replies(instructions)
    caplog.set_level(logging.WARNING, logger="strategies.fedavg")

    arrays, metrics = strategy.aggregate_train(1, [good[0], bad, good[1]])

    # The rest is aggregated exactly as if the bad reply had never arrived.
    _assert_matches_good_average(arrays, reference)
    assert metrics is not None
    assert metrics["num-examples"] == 4.0
    log = strategy.rounds[-1]
    assert log.aggregated is True
    assert [a["hospital"] for a in log.accepted] == ["hospital-1", "hospital-2"]
    assert len(log.rejected) == 1
    rejected = log.rejected[0]
    assert rejected["hospital"] == "hospital-bad"
    assert rejected["node"] == BAD_NODE
    assert BAD_CASES[case] in rejected["reason"]

    warnings = [r for r in caplog.records if r.name == "strategies.fedavg" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "hospital-bad" in text
    assert str(BAD_NODE) in text
    assert rejected["reason"] in text


def test_reply_without_node_info_is_named_by_node_id() -> None:
    strategy, instructions, _ = _start()
    bad = _reply(instructions[BAD_NODE], _content(_arrays(1), _metrics(0), hospital=None))
    strategy.aggregate_train(1, [*_good_replies(instructions), bad])
    assert strategy.rounds[-1].rejected[0]["hospital"] == f"node-{BAD_NODE}"


def test_error_reply_is_recorded_as_rejected(caplog: pytest.LogCaptureFixture) -> None:
    strategy, instructions, reference = _start()
    reason = "hospital-3: refused: round 4 would raise epsilon above its max epsilon 2"
    error = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
        reply_to=instructions[BAD_NODE],
    )
    assert error.metadata.src_node_id == BAD_NODE
    caplog.set_level(logging.WARNING, logger="strategies.fedavg")

    arrays, _ = strategy.aggregate_train(1, [error, *_good_replies(instructions)])

    _assert_matches_good_average(arrays, reference)
    log = strategy.rounds[-1]
    assert log.aggregated is True
    assert log.rejected == [{"hospital": f"node-{BAD_NODE}", "node": BAD_NODE, "reason": reason}]
    assert any(reason in r.getMessage() for r in caplog.records if r.name == "strategies.fedavg")


def test_below_quorum_returns_nothing_and_logs_not_aggregated(caplog: pytest.LogCaptureFixture) -> None:
    strategy, instructions, _ = _start(min_replies=2)
    good = _good_replies(instructions)[0]
    bad = _reply(instructions[BAD_NODE], _bad_content("NaN"))
    caplog.set_level(logging.WARNING, logger="strategies.fedavg")

    assert strategy.aggregate_train(4, [good, bad]) == (None, None)

    log = strategy.rounds[-1]
    assert log.server_round == 4
    assert log.aggregated is False
    assert [a["hospital"] for a in log.accepted] == ["hospital-1"]
    assert [r["hospital"] for r in log.rejected] == ["hospital-bad"]
    assert any("quorum" in r.getMessage() for r in caplog.records)


def test_no_valid_reply_at_all_keeps_the_model() -> None:
    strategy, instructions, _ = _start()
    error = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="no data"), reply_to=instructions[11]
    )
    bad = _reply(instructions[BAD_NODE], _bad_content("wrong shape"))
    assert strategy.aggregate_train(1, [error, bad]) == (None, None)
    assert strategy.rounds[-1].aggregated is False
    assert len(strategy.rounds[-1].rejected) == 2
    assert strategy.aggregate_train(2, []) == (None, None)
    assert [r.server_round for r in strategy.rounds] == [1, 2]
    assert strategy.rounds[-1].aggregated is False


def test_quorum_met_exactly_aggregates() -> None:
    strategy, instructions, reference = _start(min_replies=2)
    arrays, _ = strategy.aggregate_train(1, _good_replies(instructions))
    _assert_matches_good_average(arrays, reference)
    assert strategy.rounds[-1].aggregated is True


def test_a_reply_with_different_metric_keys_does_not_crash_the_round() -> None:
    strategy, instructions, _ = _start()
    good = _good_replies(instructions)
    odd_metrics = {**_metrics(2), "loss-sum": 1.5}
    odd = _reply(instructions[BAD_NODE], _content(_arrays(1), odd_metrics, "hospital-odd"))
    arrays, _ = strategy.aggregate_train(1, [*good, odd])
    assert arrays is not None
    assert strategy.rounds[-1].aggregated is True


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


# --- check_update ---------------------------------------------------------------------------


def _update(arrays: dict[str, np.ndarray] | None = None, metrics: dict | None = None) -> RecordDict:
    return _content(
        _arrays(1) if arrays is None else arrays,
        _metrics(10) if metrics is None else metrics,
        "hospital-1",
    )


def test_check_update_accepts_a_well_formed_update() -> None:
    assert check_update(_update(), _reference()) is None
    assert check_update(_update(metrics=_metrics(2.5)), _reference()) is None


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_check_update_names_the_problem(case: str) -> None:
    problem = check_update(_bad_content(case), _reference())
    assert problem is not None
    assert BAD_CASES[case] in problem


def test_check_update_names_the_offending_array() -> None:
    arrays = _arrays(1)
    arrays["b"] = np.ones(4)
    assert check_update(_update(arrays=arrays), _reference()) == "array 'b' has shape (4,), expected (3,)"
    arrays = _arrays(1)
    arrays["w"] = arrays["w"].astype(np.float16)
    problem = check_update(_update(arrays=arrays), _reference())
    assert problem == "array 'w' has dtype float16, expected float32"


def test_check_update_reports_missing_and_unexpected_names() -> None:
    arrays = _arrays(1)
    del arrays["w"]
    arrays["v"] = np.zeros((2, 2), dtype=np.float32)
    problem = check_update(_update(arrays=arrays), _reference())
    assert problem is not None
    assert "missing ['w']" in problem
    assert "unexpected ['v']" in problem


def test_check_update_requires_records() -> None:
    assert "ArrayRecord" in check_update(_content(None, _metrics(1), None), _reference())
    assert "MetricRecord" in check_update(_content(_arrays(1), None, None), _reference())


def test_check_update_uses_the_given_weight_key() -> None:
    update = _update(metrics={"records": 12, "epsilon": 0.1})
    assert check_update(update, _reference(), weight_key="records") is None
    assert "'num-examples' is missing" in check_update(update, _reference())


def test_check_update_rejects_list_and_infinite_weights() -> None:
    assert "num-examples" in check_update(_update(metrics={"num-examples": [1, 2]}), _reference())
    problem = check_update(_update(metrics={"num-examples": float("inf")}), _reference())
    assert problem == "'num-examples' must be a positive finite number, got inf"


def test_check_update_allows_extreme_but_finite_values_in_integer_arrays() -> None:
    arrays = _arrays(1)
    arrays["idx"] = np.array([np.iinfo(np.int64).max, 0, -1], dtype=np.int64)
    assert check_update(_update(arrays=arrays), _reference()) is None


# --- dropout: a bounded quorum wait ---------------------------------------------------------


def test_round_goes_only_to_participants_online_now() -> None:
    strategy = ValidatedFedAvg(action="generator", min_replies=2, quorum_timeout_s=0.0)
    strategy.participants = {11, 22, 33}
    messages = strategy.configure_train(1, _reference(), ConfigRecord(), StaticGrid([22, 11, 44]))
    assert [m.metadata.dst_node_id for m in messages] == [11, 22]  # 33 offline, 44 not a participant


def test_quorum_wait_is_bounded_and_names_the_offline_nodes() -> None:
    strategy = ValidatedFedAvg(action="generator", min_replies=2, quorum_timeout_s=0.0)
    strategy.participants = {11, 22, 33}
    with pytest.raises(QuorumError) as raised:
        strategy.configure_train(4, _reference(), ConfigRecord(), StaticGrid([11]))
    message = str(raised.value)
    assert "round 4: 1 participating hospital(s) online" in message
    assert "quorum is 2" in message
    assert "offline node ids: [22, 33]" in message
    assert "resume=true" in message


# --- start: resuming mid-way and the checkpoint hook ----------------------------------------


class AnsweringGrid(StaticGrid):
    """Every node answers a train message with an update of scale = the round number."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        super().__init__(node_ids)
        self.rounds_sent: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.rounds_sent.extend({int(m.content.config_records["config"]["server-round"]) for m in messages})
        return [
            _reply(
                m,
                _content(
                    _arrays(int(m.content.config_records["config"]["server-round"])), _metrics(1), f"h{i}"
                ),
            )
            for i, m in enumerate(messages)
        ]


def test_start_from_a_checkpointed_round_runs_only_the_rounds_left() -> None:
    strategy = ValidatedFedAvg(action="generator", quorum_timeout_s=0.0)
    grid = AnsweringGrid(GOOD_NODES)
    evaluated: list[int] = []
    checkpoints: list[tuple[int, float]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated.append(server_round)
        return MetricRecord({"score": float(server_round)})

    result = strategy.start(
        grid,
        _reference(),
        num_rounds=4,
        evaluate_fn=evaluate,
        first_round=3,
        after_round=lambda r, arrays: checkpoints.append((r, float(arrays["t"].numpy()))),
    )
    assert grid.rounds_sent == [3, 4]
    assert evaluated == [3, 4]  # no round-0 evaluation when resuming
    assert [log.server_round for log in strategy.rounds] == [3, 4]
    # the hook sees each completed round's aggregate: t = 2 x round for every node's update
    assert checkpoints == [(3, 6.0), (4, 8.0)]
    assert float(result.arrays["t"].numpy()) == 8.0
    assert sorted(result.evaluate_metrics_serverapp) == [3, 4]


def test_checkpoint_hook_gets_the_rollback_weights_the_next_round_is_sent() -> None:
    strategy = ValidatedFedAvg(action="generator", quorum_timeout_s=0.0)
    best = ArrayRecord({k: Array(v) for k, v in _arrays(9).items()})

    def evaluate(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 1:
            strategy.override_arrays = best  # what SA-DQC does on a rollback

    sent: list[ArrayRecord] = []
    strategy.start(
        AnsweringGrid(GOOD_NODES),
        _reference(),
        num_rounds=1,
        evaluate_fn=evaluate,
        after_round=lambda r, arrays: sent.append(arrays),
    )
    assert sent == [best]


def test_a_node_the_superlink_lost_is_logged_under_its_hospital() -> None:
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strategy, instructions, _ = _start()
    strategy.hospital_names = {BAD_NODE: "hospital-3"}
    for node, message in instructions.items():  # what the Grid does when it pushes them
        message.metadata.__dict__["_message_id"] = f"msg-{node}"
    # Flower's own reply for a message whose node went offline (sent by the SuperLink itself)
    lost = create_message_error_unavailable_res_message(instructions[BAD_NODE].metadata, "node_unavail")
    assert lost.metadata.src_node_id == SUPERLINK_NODE_ID
    arrays, _ = strategy.aggregate_train(1, [*_good_replies(instructions), lost])
    assert arrays is not None
    (rejected,) = strategy.rounds[0].rejected
    assert (rejected["hospital"], rejected["node"]) == ("hospital-3", BAD_NODE)
    assert "unavailable" in rejected["reason"].lower()
