"""Tests for strategies.validating.ValidatingStrategy around FedAvg: checks, quorum, dropout, resume."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from strategies.catalog import build_strategy
from strategies.rounds import QuorumError
from strategies.validating import ValidatingStrategy
from tests.strategies.support import (
    BAD_CASES,
    BAD_NODE,
    GOOD_NODES,
    WEIGHTS,
    AnsweringGrid,
    StaticGrid,
    arrays_of,
    assert_matches_good_average,
    bad_content,
    content,
    expected_average,
    good_replies,
    metrics,
    record,
    reference,
    reply,
    start,
)

LOGGER = "strategies.validating"


def _wrapper(**kwargs) -> ValidatingStrategy:
    kwargs.setdefault("weights", WEIGHTS)
    inner = kwargs.pop("inner", None) or build_strategy("fedavg")
    return ValidatingStrategy(inner, action=kwargs.pop("action", "generator"), **kwargs)


# --- construction ---------------------------------------------------------------------------


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="identifier"):
        _wrapper(action="train.generator")
    with pytest.raises(ValueError, match="min_replies"):
        _wrapper(min_replies=0)
    with pytest.raises(ValueError, match="fraction_train=0"):
        _wrapper(inner=build_strategy("fedavg").__class__(fraction_train=0.0))
    for weights in ({}, {"hospital-1": 0.0}, {"hospital-1": float("nan")}, {"hospital-1": float("inf")}):
        with pytest.raises(ValueError, match="weights must map hospitals"):
            _wrapper(weights=weights)
    for ratio in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_update_norm_ratio"):
            _wrapper(max_update_norm_ratio=ratio)


def test_inner_sampling_minima_are_lowered_so_sampling_never_blocks() -> None:
    from flwr.serverapp.strategy import FedAvg

    inner = FedAvg(min_train_nodes=5, min_available_nodes=9)
    strategy = ValidatingStrategy(inner, action="generator", weights=WEIGHTS, quorum_timeout_s=0.0)
    messages = list(strategy.configure_train(1, reference(), ConfigRecord(), StaticGrid([4])))
    assert (inner.min_train_nodes, inner.min_available_nodes) == (1, 1)
    assert [m.metadata.dst_node_id for m in messages] == [4]


# --- configure_train ------------------------------------------------------------------------


def test_configure_train_sends_train_action_messages_to_every_node() -> None:
    strategy, instructions, ref = start()
    assert sorted(instructions) == sorted((*GOOD_NODES, BAD_NODE))
    for node, message in instructions.items():
        assert message.metadata.message_type == "train.generator"
        assert message.metadata.dst_node_id == node
        assert message.metadata.src_node_id == SUPERLINK_NODE_ID
        assert message.content.array_records["arrays"] is ref
        config = message.content.config_records["config"]
        assert config["server-round"] == 1
        assert config["seed"] == 7
    assert strategy.rounds == []


def test_configure_train_uses_the_strategy_action() -> None:
    strategy = _wrapper(action="risk_model")
    messages = list(strategy.configure_train(3, reference(), ConfigRecord(), StaticGrid([5])))
    assert [m.metadata.message_type for m in messages] == ["train.risk_model"]


def test_configure_train_sends_a_pending_rollback_once() -> None:
    strategy = _wrapper(quorum_timeout_s=0.0)
    best = record(arrays_of(9))
    strategy.override_arrays = best
    (first,) = strategy.configure_train(2, reference(), ConfigRecord(), StaticGrid([5]))
    assert first.content.array_records["arrays"] is best
    assert strategy.override_arrays is None
    latest = reference()
    (second,) = strategy.configure_train(3, latest, ConfigRecord(), StaticGrid([5]))
    assert second.content.array_records["arrays"] is latest


def test_replies_carry_the_answering_nodes_id() -> None:
    _, instructions, _ = start()
    answer = reply(instructions[22], content(arrays_of(1), metrics(1), "hospital-2"))
    assert answer.metadata.src_node_id == 22
    assert answer.metadata.message_type == "train.generator"


# --- aggregate_train: arithmetic ------------------------------------------------------------


def test_weighted_average_is_exact_and_keeps_dtypes_and_0d_shapes() -> None:
    strategy, instructions, ref = start(nodes=GOOD_NODES)
    arrays, merged = strategy.aggregate_train(1, good_replies(instructions))

    assert_matches_good_average(arrays, ref)
    assert arrays["w"].numpy().tolist() == [[4.0, 8.0], [12.0, 16.0]]  # (1*[1..4] + 3*[5..20]) / 4
    assert arrays["count"].numpy().shape == ()
    assert arrays["count"].numpy().dtype == np.int64
    assert int(arrays["count"].numpy()) == 16  # (1*4 + 3*20) / 4
    assert arrays["t"].numpy().shape == ()
    assert float(arrays["t"].numpy()) == 8.0  # (1*2 + 3*10) / 4
    assert arrays["idx"].numpy().tolist() == [4, 8, 12]

    assert merged is not None
    assert merged["num-examples"] == 4.0
    assert merged["epsilon"] == 1.1  # max over hospitals, not an average
    assert merged["steps"] == 20.0

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
    strategy, instructions, ref = start(
        nodes=nodes, weights={f"h{n}": w for n, w in zip(nodes, weights, strict=True)}
    )
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
        reply(instructions[node], content(values, metrics(1), f"h{node}"))  # the claimed 1 is ignored
        for node, values in zip(nodes, updates, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    total = sum(weights)
    for name, want_array in ref.items():
        want = sum(w * u[name].astype(np.float64) for w, u in zip(weights, updates, strict=True)) / total
        got = arrays[name].numpy()
        assert got.dtype == want_array.numpy().dtype
        assert got.shape == want_array.numpy().shape
        if np.issubdtype(got.dtype, np.integer):
            np.testing.assert_array_equal(got, np.rint(want).astype(got.dtype))
        elif got.dtype == np.float32:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_integer_buffers_are_rounded_back_to_integers() -> None:
    strategy, instructions, _ = start(nodes=GOOD_NODES)
    low, high = arrays_of(1), arrays_of(1)
    low["idx"] = np.array([0, 0, 1], dtype=np.int64)
    high["idx"] = np.array([1, 2, 1], dtype=np.int64)
    replies = [
        reply(instructions[11], content(low, metrics(1), "hospital-1")),
        reply(instructions[22], content(high, metrics(3), "hospital-2")),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    idx = arrays["idx"].numpy()
    assert idx.dtype == np.int64
    assert idx.tolist() == [1, 2, 1]  # 0.75 -> 1, 1.5 -> 2 (round half to even), 1 -> 1


def test_arrival_order_does_not_change_the_aggregate() -> None:
    rng = np.random.default_rng(5)
    nodes = (1, 2, 3, 4)
    strategy, instructions, _ = start(nodes=nodes, weights={f"h{n}": float(n) for n in nodes})
    replies = [
        reply(
            instructions[n],
            content({**arrays_of(1), "w": rng.normal(size=(2, 2)).astype(np.float32)}, metrics(n), f"h{n}"),
        )
        for n in nodes
    ]
    forward, _ = strategy.aggregate_train(1, replies)
    backward, _ = strategy.aggregate_train(1, replies[::-1])
    assert forward["w"].numpy().tobytes() == backward["w"].numpy().tobytes()


# --- aggregate_train: rejections ------------------------------------------------------------


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_malformed_update_is_rejected_logged_and_left_out(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    strategy, instructions, ref = start()
    bad = reply(instructions[BAD_NODE], bad_content(case))
    good = good_replies(instructions)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    arrays, merged = strategy.aggregate_train(1, [good[0], bad, good[1]])

    # The rest is aggregated exactly as if the bad reply had never arrived.
    assert_matches_good_average(arrays, ref)
    assert merged is not None
    assert merged["num-examples"] == 4.0
    log = strategy.rounds[-1]
    assert log.aggregated is True
    assert [a["hospital"] for a in log.accepted] == ["hospital-1", "hospital-2"]
    assert len(log.rejected) == 1
    rejected = log.rejected[0]
    assert rejected["hospital"] == "hospital-bad"
    assert rejected["node"] == BAD_NODE
    assert BAD_CASES[case] in rejected["reason"]

    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "hospital-bad" in text
    assert str(BAD_NODE) in text
    assert rejected["reason"] in text


def test_reply_without_node_info_is_named_by_node_id() -> None:
    strategy, instructions, _ = start()
    bad = reply(instructions[BAD_NODE], content(arrays_of(1), metrics(0), hospital=None))
    strategy.aggregate_train(1, [*good_replies(instructions), bad])
    assert strategy.rounds[-1].rejected[0]["hospital"] == f"node-{BAD_NODE}"


def test_error_reply_is_recorded_as_rejected(caplog: pytest.LogCaptureFixture) -> None:
    strategy, instructions, ref = start()
    reason = "hospital-3: refused: round 4 would raise epsilon above its max epsilon 2"
    error = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
        reply_to=instructions[BAD_NODE],
    )
    assert error.metadata.src_node_id == BAD_NODE
    caplog.set_level(logging.WARNING, logger=LOGGER)

    arrays, _ = strategy.aggregate_train(1, [error, *good_replies(instructions)])

    assert_matches_good_average(arrays, ref)
    log = strategy.rounds[-1]
    assert log.aggregated is True
    assert log.rejected == [{"hospital": f"node-{BAD_NODE}", "node": BAD_NODE, "reason": reason}]
    assert any(reason in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_below_quorum_returns_nothing_and_logs_not_aggregated(caplog: pytest.LogCaptureFixture) -> None:
    strategy, instructions, _ = start(min_replies=2)
    good = good_replies(instructions)[0]
    bad = reply(instructions[BAD_NODE], bad_content("NaN"))
    caplog.set_level(logging.WARNING, logger=LOGGER)

    assert strategy.aggregate_train(4, [good, bad]) == (None, None)

    log = strategy.rounds[-1]
    assert log.server_round == 4
    assert log.aggregated is False
    assert [a["hospital"] for a in log.accepted] == ["hospital-1"]
    assert [r["hospital"] for r in log.rejected] == ["hospital-bad"]
    assert any("quorum" in r.getMessage() for r in caplog.records)


def test_no_valid_reply_at_all_keeps_the_model() -> None:
    strategy, instructions, _ = start()
    error = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="no data"), reply_to=instructions[11]
    )
    bad = reply(instructions[BAD_NODE], bad_content("wrong shape"))
    assert strategy.aggregate_train(1, [error, bad]) == (None, None)
    assert strategy.rounds[-1].aggregated is False
    assert len(strategy.rounds[-1].rejected) == 2
    assert strategy.aggregate_train(2, []) == (None, None)
    assert [r.server_round for r in strategy.rounds] == [1, 2]
    assert strategy.rounds[-1].aggregated is False


def test_quorum_met_exactly_aggregates() -> None:
    strategy, instructions, ref = start(min_replies=2)
    arrays, _ = strategy.aggregate_train(1, good_replies(instructions))
    assert_matches_good_average(arrays, ref)
    assert strategy.rounds[-1].aggregated is True


def test_a_reply_with_different_metric_keys_does_not_crash_the_round() -> None:
    strategy, instructions, _ = start()
    good = good_replies(instructions)
    odd_metrics = {**metrics(2), "loss-sum": 1.5}
    odd = reply(instructions[BAD_NODE], content(arrays_of(1), odd_metrics, "hospital-odd"))
    arrays, merged = strategy.aggregate_train(1, [*good, odd])
    assert arrays is not None
    assert strategy.rounds[-1].aggregated is True
    assert merged["loss-sum"] == 1.5  # the wrapper merges the full metric sets
    assert merged["num-examples"] == 6.0


# --- aggregate_train: the server's weights and the update norm bound ------------------------


def test_a_huge_norm_update_is_rejected_and_the_rest_average_by_their_weights(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy, instructions, ref = start()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    huge = reply(instructions[BAD_NODE], bad_content("huge norm"))  # hospital-bad, weight 7
    arrays, merged = strategy.aggregate_train(1, [huge, *good_replies(instructions)])
    assert_matches_good_average(arrays, ref)  # (1 x1 + 3 x2) / 4, exactly
    assert merged["num-examples"] == 4.0
    (rejected,) = strategy.rounds[-1].rejected
    assert rejected["hospital"] == "hospital-bad" and "norm ratio 4.924e+29" in rejected["reason"]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "hospital-bad" in warning and "update norm ratio 4.924e+29" in warning


def test_an_inflated_or_missing_count_in_a_reply_does_not_change_the_average() -> None:
    strategy, instructions, ref = start()
    inflated = content(arrays_of(1), metrics(1e12, epsilon=0.4), "hospital-1")
    silent = content(arrays_of(5), {"epsilon": 1.1}, "hospital-2")  # no "num-examples" at all
    replies = [reply(instructions[11], inflated), reply(instructions[22], silent)]
    arrays, merged = strategy.aggregate_train(1, replies)
    assert_matches_good_average(arrays, ref)
    assert merged["num-examples"] == 4.0  # the weights used, not the 1e12 claimed
    log = strategy.rounds[-1]
    assert log.rejected == []
    assert [(a["hospital"], a["num-examples"]) for a in log.accepted] == [
        ("hospital-1", 1.0),
        ("hospital-2", 3.0),
    ]


def test_the_weights_come_from_the_mapping() -> None:
    strategy, instructions, ref = start(weights={"hospital-1": 3.0, "hospital-2": 1.0})
    arrays, merged = strategy.aggregate_train(1, good_replies(instructions))  # replies claim 1 and 3
    assert_matches_good_average(arrays, ref, w1=3.0, w2=1.0)
    assert (
        arrays["w"].numpy().tolist()
        == expected_average(3.0, 1.0)["w"].tolist()
        == [
            [2.0, 4.0],
            [6.0, 8.0],
        ]
    )
    assert merged["num-examples"] == 4.0


def test_a_node_is_weighed_under_its_handshake_name_not_the_name_it_claims() -> None:
    strategy, instructions, ref = start()
    strategy.hospital_names = {11: "hospital-1", 22: "hospital-2", BAD_NODE: "hospital-3"}
    claims_more = content(arrays_of(5), metrics(3), "hospital-bad")  # node 22; hospital-bad weighs 7
    replies = [good_replies(instructions)[0], reply(instructions[22], claims_more)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert_matches_good_average(arrays, ref)  # node 22 still weighs 3
    unknown = reply(instructions[BAD_NODE], content(arrays_of(2), metrics(5), "hospital-2"))
    strategy.aggregate_train(2, [*good_replies(instructions), unknown])
    (rejected,) = strategy.rounds[-1].rejected
    assert (rejected["node"], rejected["reason"]) == (BAD_NODE, "no handshake weight for hospital-3")


# --- client-side evaluation is off ----------------------------------------------------------


def test_no_client_side_evaluation() -> None:
    strategy = _wrapper()
    assert list(strategy.configure_evaluate(1, reference(), ConfigRecord(), StaticGrid([1, 2]))) == []
    assert strategy.aggregate_evaluate(1, []) is None


# --- dropout: a bounded quorum wait ---------------------------------------------------------


def test_round_goes_only_to_participants_online_now() -> None:
    strategy = _wrapper(min_replies=2, quorum_timeout_s=0.0)
    strategy.participants = {11, 22, 33}
    messages = strategy.configure_train(1, reference(), ConfigRecord(), StaticGrid([22, 11, 44]))
    assert [m.metadata.dst_node_id for m in messages] == [11, 22]  # 33 offline, 44 not a participant


def test_quorum_wait_is_bounded_and_names_the_offline_nodes() -> None:
    strategy = _wrapper(min_replies=2, quorum_timeout_s=0.0)
    strategy.participants = {11, 22, 33}
    with pytest.raises(QuorumError) as raised:
        strategy.configure_train(4, reference(), ConfigRecord(), StaticGrid([11]))
    message = str(raised.value)
    assert "round 4: 1 participating hospital(s) online" in message
    assert "quorum is 2" in message
    assert "offline node ids: [22, 33]" in message
    assert "resume=true" in message


def test_a_node_the_superlink_lost_is_logged_under_its_hospital() -> None:
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strategy, instructions, _ = start()
    strategy.hospital_names = {BAD_NODE: "hospital-3"}
    for node, message in instructions.items():  # what the Grid does when it pushes them
        message.metadata.__dict__["_message_id"] = f"msg-{node}"
    # Flower's own reply for a message whose node went offline (sent by the SuperLink itself)
    lost = create_message_error_unavailable_res_message(instructions[BAD_NODE].metadata, "node_unavail")
    assert lost.metadata.src_node_id == SUPERLINK_NODE_ID
    arrays, _ = strategy.aggregate_train(1, [*good_replies(instructions), lost])
    assert arrays is not None
    (rejected,) = strategy.rounds[0].rejected
    assert (rejected["hospital"], rejected["node"]) == ("hospital-3", BAD_NODE)
    assert "unavailable" in rejected["reason"].lower()


# --- start: Flower's loop, resuming mid-way, and the checkpoint hook ------------------------


def test_start_from_a_checkpointed_round_runs_only_the_rounds_left() -> None:
    strategy = _wrapper(quorum_timeout_s=0.0)
    grid = AnsweringGrid(GOOD_NODES)
    evaluated: list[int] = []
    checkpoints: list[tuple[int, float]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated.append(server_round)
        return MetricRecord({"score": float(server_round)})

    result = strategy.start(
        grid,
        reference(),
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
    assert sorted(result.train_metrics_clientapp) == [3, 4]
    assert strategy._round_offset == 0  # direct calls after start see real rounds again


def test_a_fresh_start_scores_the_initial_weights_first() -> None:
    strategy = _wrapper(quorum_timeout_s=0.0)
    grid = AnsweringGrid(GOOD_NODES)
    calls: list[tuple[str, int]] = []
    initial = reference()

    def evaluate(server_round: int, arrays: ArrayRecord) -> None:
        calls.append(("evaluate", server_round))
        if server_round == 0:
            assert arrays is initial

    strategy.start(
        grid,
        initial,
        num_rounds=2,
        evaluate_fn=evaluate,
        after_round=lambda r, arrays: calls.append(("after_round", r)),
    )
    assert grid.rounds_sent == [1, 2]
    assert calls == [
        ("evaluate", 0),
        ("evaluate", 1),
        ("after_round", 1),
        ("evaluate", 2),
        ("after_round", 2),
    ]
    assert [[m.metadata.message_type for m in batch] for batch in grid.batches] == [
        ["train.generator"] * 2
    ] * 2


def test_after_round_runs_without_an_evaluate_fn_and_nothing_left_runs_nothing() -> None:
    strategy = _wrapper(quorum_timeout_s=0.0)
    done: list[int] = []
    strategy.start(
        AnsweringGrid(GOOD_NODES), reference(), num_rounds=2, after_round=lambda r, a: done.append(r)
    )
    assert done == [1, 2]
    grid = AnsweringGrid(GOOD_NODES)
    result = strategy.start(grid, reference(), num_rounds=2, first_round=3)
    assert grid.rounds_sent == []
    assert len(result.arrays) == 0
    with pytest.raises(ValueError, match="first_round"):
        strategy.start(grid, reference(), num_rounds=2, first_round=0)


def test_checkpoint_hook_gets_the_rollback_weights_the_next_round_is_sent() -> None:
    strategy = _wrapper(quorum_timeout_s=0.0)
    best = ArrayRecord({k: Array(v) for k, v in arrays_of(9).items()})

    def evaluate(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 1:
            strategy.override_arrays = best  # what SA-DQC does on a rollback

    sent: list[ArrayRecord] = []
    grid = AnsweringGrid(GOOD_NODES)
    strategy.start(
        grid,
        reference(),
        num_rounds=2,
        evaluate_fn=evaluate,
        after_round=lambda r, arrays: sent.append(arrays),
    )
    assert sent[0] is best
    # round 2 was sent the rollback weights, not round 1's aggregate
    assert len(grid.batches) == 2
    assert all(m.content.array_records["arrays"] is best for m in grid.batches[1])
    assert all(m.content.array_records["arrays"] is not best for m in grid.batches[0])
