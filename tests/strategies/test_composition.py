"""ValidatingStrategy around Flower's FedAvg, FedProx and FedAdam: what each inner strategy sees and does."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from configs.wire import NODE_INFO as NODE_INFO_KEY
from strategies.aggregation import cast_like
from strategies.catalog import build_strategy, build_validating_strategy
from strategies.rounds import hospital_of
from strategies.validating import ValidatingStrategy
from tests.strategies.support import (
    BAD_NODE,
    GOOD_NODES,
    WEIGHTS,
    AnsweringGrid,
    arrays_of,
    bad_content,
    content,
    good_replies,
    metrics,
    reference,
    reply,
    start,
)


class SpyFedAvg(FedAvg):
    """Flower's FedAvg that records every (round, replies) it is asked to aggregate."""

    def __init__(self) -> None:
        super().__init__(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
        self.seen: list[tuple[int, list[Message]]] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.seen.append((server_round, replies))
        return super().aggregate_train(server_round, replies)


def _random_weights(nodes: Iterable[int], seed: int) -> dict[str, float]:
    """What the handshake would give each hospital: a DP count, not an integer."""
    rng = np.random.default_rng(seed + 100)
    return {f"hospital-{node}": float(rng.uniform(1, 500)) for node in nodes}


def _random_replies(instructions: dict[int, Message], seed: int) -> list[Message]:
    """Float updates with random values; each hospital reports a different metric set and a
    random count, which the wrapper ignores."""
    rng = np.random.default_rng(seed)
    replies = []
    for i, (node, instruction) in enumerate(sorted(instructions.items(), reverse=True)):
        update = {
            "w": rng.normal(size=(2, 2)).astype(np.float32),
            "b": rng.normal(size=3),
            "t": np.array(rng.normal(), dtype=np.float32),
            "count": np.array(rng.integers(0, 100), dtype=np.int64),
            "idx": rng.integers(0, 100, size=3).astype(np.int64),
        }
        weights = {**metrics(int(rng.integers(1, 500))), f"extra-{i}": float(i)}
        replies.append(reply(instruction, content(update, weights, f"hospital-{node}")))
    return replies


# --- FedAvg: bit-identical to the aggregation the old ValidatedFedAvg did -------------------


def test_inner_fedavg_is_bit_identical_to_a_direct_weighted_average() -> None:
    nodes = (5, 1, 9, 3, 7)
    for seed in range(5):
        weights = _random_weights(nodes, seed)
        strategy, instructions, ref = start(nodes=nodes, weights=weights)
        replies = _random_replies(instructions, seed)
        arrays, _ = strategy.aggregate_train(1, replies)
        # Every accepted reply, sorted by hospital, averaged whole by the handshake's weights.
        records = [
            RecordDict(
                {
                    "arrays": m.content.array_records["arrays"],
                    "metrics": MetricRecord({"num-examples": weights[hospital_of(m)]}),
                }
            )
            for m in sorted(replies, key=hospital_of)
        ]
        direct = cast_like(aggregate_arrayrecords(records, "num-examples"), ref)
        assert arrays is not None
        assert list(arrays) == list(direct)
        for name in direct:
            got, want = arrays[name].numpy(), direct[name].numpy()
            assert (got.dtype, got.shape) == (want.dtype, want.shape)
            assert got.tobytes() == want.tobytes(), name


def test_a_malformed_reply_never_reaches_the_inner_strategy() -> None:
    spy = SpyFedAvg()
    strategy, instructions, _ = start(inner=spy)
    odd = {**metrics(3, epsilon=1.1), "loss-sum": 2.0}
    replies = [
        reply(instructions[22], content(arrays_of(5), odd, "hospital-2")),
        reply(instructions[BAD_NODE], bad_content("NaN")),
        reply(instructions[11], content(arrays_of(1), metrics(1, epsilon=0.4), "hospital-1")),
    ]
    strategy.aggregate_train(1, replies)

    ((server_round, seen),) = spy.seen
    assert server_round == 1
    assert [m.metadata.src_node_id for m in seen] == [11, 22]  # sorted by hospital, bad one absent
    for message, weight in zip(seen, (1, 3), strict=True):
        # canonical: the update's arrays and the server's weight, nothing else (no node-info, no
        # extra metrics)
        assert set(message.content.keys()) == {"arrays", "metrics"}
        assert dict(message.content.metric_records["metrics"]) == {"num-examples": weight}
        assert NODE_INFO_KEY not in message.content.config_records
    assert seen[1].content.array_records["arrays"] is replies[0].content.array_records["arrays"]


def test_nothing_reaches_the_inner_strategy_below_quorum() -> None:
    spy = SpyFedAvg()
    strategy, instructions, _ = start(inner=spy, min_replies=2)
    bad = reply(instructions[BAD_NODE], bad_content("wrong shape"))
    assert strategy.aggregate_train(1, [good_replies(instructions)[0], bad]) == (None, None)
    assert spy.seen == []


def test_a_resumed_run_shows_the_inner_strategy_real_round_numbers() -> None:
    spy = SpyFedAvg()
    strategy = ValidatingStrategy(spy, action="generator", weights=WEIGHTS, quorum_timeout_s=0.0)
    strategy.start(AnsweringGrid(GOOD_NODES), reference(), num_rounds=5, first_round=4)
    assert [r for r, _ in spy.seen] == [4, 5]


# --- FedProx --------------------------------------------------------------------------------


def test_fedprox_sends_proximal_mu_in_every_train_message() -> None:
    inner = build_strategy("fedprox", {"proximal_mu": 0.25})
    _, instructions, _ = start(inner=inner)
    assert sorted(instructions) == sorted((*GOOD_NODES, BAD_NODE))
    for message in instructions.values():
        assert message.metadata.message_type == "train.generator"
        config = message.content.config_records["config"]
        assert config["proximal-mu"] == 0.25
        assert config["seed"] == 7
        assert config["server-round"] == 1


def test_fedprox_through_start_sends_proximal_mu_each_round() -> None:
    strategy = build_validating_strategy(
        "fedprox", {"proximal_mu": 0.5}, action="risk_model", weights=WEIGHTS, quorum_timeout_s=0.0
    )
    grid = AnsweringGrid(GOOD_NODES)
    strategy.start(grid, reference(), num_rounds=2, train_config=ConfigRecord({"lr": 0.1}))
    assert grid.rounds_sent == [1, 2]
    for batch in grid.batches:
        assert [m.metadata.message_type for m in batch] == ["train.risk_model"] * 2
        assert all(m.content.config_records["config"]["proximal-mu"] == 0.5 for m in batch)


# --- FedAdam --------------------------------------------------------------------------------


def test_fedadam_moves_the_model_by_an_adam_step_not_to_the_average_and_keeps_dtypes() -> None:
    adam, instructions, ref = start(nodes=GOOD_NODES, inner=build_strategy("fedadam", {"eta": 0.5}))
    avg, avg_instructions, _ = start(nodes=GOOD_NODES)
    adam_arrays, adam_metrics = adam.aggregate_train(1, good_replies(instructions))
    avg_arrays, avg_metrics = avg.aggregate_train(1, good_replies(avg_instructions))

    assert adam_arrays is not None and avg_arrays is not None
    assert dict(adam_metrics) == dict(avg_metrics)
    for name, want in ref.items():
        got = adam_arrays[name].numpy()
        assert (got.dtype, got.shape) == (want.numpy().dtype, want.numpy().shape), name
    assert not np.array_equal(adam_arrays["w"].numpy(), avg_arrays["w"].numpy())

    # First round, d = average - global: m = (1 - b1) d, v = (1 - b2) d^2,
    # new = global + eta_norm m / (sqrt(v) + tau).
    inner = adam.inner
    assert isinstance(inner, FedAdam)
    eta_norm = 0.5 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    for name in ("w", "b", "t"):
        start_from = ref[name].numpy().astype(np.float64)
        delta = avg_arrays[name].numpy().astype(np.float64) - start_from
        step = eta_norm * (0.1 * delta) / (np.sqrt(0.01 * delta**2) + 1e-3)
        np.testing.assert_allclose(adam_arrays[name].numpy(), start_from + step, rtol=1e-5)
    assert adam.rounds[-1].aggregated is True


def test_fedadam_state_follows_the_weights_actually_sent() -> None:
    strategy = build_validating_strategy(
        "fedadam", {}, action="generator", weights=WEIGHTS, quorum_timeout_s=0.0
    )
    grid = AnsweringGrid(GOOD_NODES)
    result = strategy.start(grid, reference(), num_rounds=3)
    inner = strategy.inner
    assert isinstance(inner, FedAdam)
    sent = grid.batches[-1][0].content.array_records["arrays"]
    assert set(inner.current_arrays) == set(sent)
    np.testing.assert_array_equal(inner.current_arrays["w"], sent["w"].numpy())
    assert result.arrays["count"].numpy().dtype == np.int64
    assert result.arrays["t"].numpy().shape == ()
