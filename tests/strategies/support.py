"""Test doubles and update builders shared by the strategy tests (Grids, replies, malformed cases)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from configs.wire import NODE_INFO as NODE_INFO_KEY
from strategies.catalog import build_strategy
from strategies.validating import ValidatingStrategy

GOOD_NODES = (11, 22)
BAD_NODE = 33
# hospital -> its FedAvg weight, as the handshake gives it (the replies' own counts are ignored)
WEIGHTS = {
    "hospital-1": 1.0,
    "hospital-2": 3.0,
    "hospital-bad": 7.0,
    "hospital-odd": 2.0,
    "h0": 1.0,
    "h1": 1.0,
}


class StaticGrid(Grid):
    """A Grid whose only working surface is the set of connected node ids.

    configure_train only asks the Grid for node ids; anything else would mean the strategy
    tried to talk to nodes, which these unit tests do not allow.
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


def round_of(message: Message) -> int:
    return int(message.content.config_records["config"]["server-round"])


class AnsweringGrid(StaticGrid):
    """Every node answers a train message with an update of scale = the round number."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        super().__init__(node_ids)
        self.rounds_sent: list[int] = []
        self.batches: list[list[Message]] = []  # what each send_and_receive call carried

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages:  # Flower's loop also "sends" the (empty) evaluation round
            self.batches.append(messages)
        self.rounds_sent.extend(sorted({round_of(m) for m in messages}))
        return [
            reply(m, content(arrays_of(round_of(m)), metrics(1), f"h{i}")) for i, m in enumerate(messages)
        ]


def reference() -> ArrayRecord:
    """The global weights sent: w (2, 2) float32, b float64, t 0-d float32, count 0-d int64
    (a BatchNorm-like buffer), idx int64; not zero, so the update norm bound is a realistic one."""
    return record(arrays_of(3))


def arrays_of(scale: float) -> dict[str, np.ndarray]:
    """A well-formed update whose values are dyadic (exact in binary) multiples of `scale`."""
    return {
        "w": (np.arange(4, dtype=np.float32).reshape(2, 2) + 1) * np.float32(scale),
        "b": np.array([0.5, -1.25, 3.0]) * scale,
        "t": np.array(2.0 * scale, dtype=np.float32),
        "count": np.array(int(4 * scale), dtype=np.int64),
        "idx": np.array([1, 2, 3], dtype=np.int64) * int(scale),
    }


def record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def content(
    arrays: dict[str, np.ndarray] | None,
    metrics: dict | None,
    hospital: str | None,
    *,
    extra_records: dict | None = None,
) -> RecordDict:
    records: dict = {}
    if arrays is not None:
        records["arrays"] = record(arrays)
    if metrics is not None:
        records["metrics"] = MetricRecord(metrics)
    if hospital is not None:
        records[NODE_INFO_KEY] = ConfigRecord({"hospital": hospital})
    records.update(extra_records or {})
    return RecordDict(records)


def metrics(weight: int | float, epsilon: float = 0.5) -> dict:
    """A reply's metrics; its "num-examples" is what an old ClientApp claims, and is ignored."""
    return {"num-examples": weight, "epsilon": epsilon, "steps": 10.0}


def start(
    nodes: Iterable[int] = (*GOOD_NODES, BAD_NODE),
    inner: Strategy | None = None,
    weights: dict[str, float] | None = None,
    **kwargs,
) -> tuple[ValidatingStrategy, dict[int, Message], ArrayRecord]:
    """A wrapper (around FedAvg unless `inner` is given) that has configured round 1 for `nodes`."""
    inner = inner or build_strategy("fedavg")
    strategy = ValidatingStrategy(inner, action="generator", weights=weights or WEIGHTS, **kwargs)
    ref = reference()
    instructions = strategy.configure_train(1, ref, ConfigRecord({"seed": 7}), StaticGrid(nodes))
    return strategy, {m.metadata.dst_node_id: m for m in instructions}, ref


def reply(instruction: Message, answer: RecordDict) -> Message:
    """The node's answer, built the way a ClientApp builds it (src node id = the node's)."""
    return Message(answer, reply_to=instruction)


def good_replies(instructions: dict[int, Message]) -> list[Message]:
    # WEIGHTS 1 and 3 on updates of scale 1 and 5: the average is (1*x1 + 3*x2) / 4.
    return [
        reply(instructions[11], content(arrays_of(1), metrics(1, epsilon=0.4), "hospital-1")),
        reply(instructions[22], content(arrays_of(5), metrics(3, epsilon=1.1), "hospital-2")),
    ]


def expected_average(w1: float = 1.0, w2: float = 3.0) -> dict[str, np.ndarray]:
    x1, x2 = arrays_of(1), arrays_of(5)
    return {k: (w1 * x1[k].astype(np.float64) + w2 * x2[k].astype(np.float64)) / (w1 + w2) for k in x1}


def assert_matches_good_average(
    arrays: ArrayRecord | None, ref: ArrayRecord, w1: float = 1.0, w2: float = 3.0
) -> None:
    assert arrays is not None
    assert list(arrays.keys()) == list(ref.keys())
    expected = expected_average(w1, w2)
    for name, want_array in ref.items():
        got, want = arrays[name].numpy(), want_array.numpy()
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, np.rint(expected[name]).astype(want.dtype))
        else:
            np.testing.assert_array_equal(got, expected[name].astype(want.dtype))


def bad_content(case: str) -> RecordDict:
    """A reply from "hospital-bad" that is malformed in the way `case` names (see BAD_CASES)."""
    arrays, weights = arrays_of(2), metrics(7)
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
    elif case == "huge norm":  # 1e30-scale weights: would swamp any weighted average
        arrays["w"] = arrays["w"] * np.float32(1e30)
        arrays["b"] = arrays["b"] * 1e30
    elif case == "norm just over the bound":  # 10 x ||global|| away, and a little more
        arrays["b"] = reference()["b"].numpy() + np.array([10.01 * _norm(reference()), 0.0, 0.0])
    elif case == "NaN metric":
        weights["epsilon"] = float("nan")
    elif case == "infinite count":
        weights["num-examples"] = float("inf")
    elif case == "two ArrayRecords":
        extra_records = {"more-arrays": record(arrays_of(1))}
    elif case == "two MetricRecords":
        extra_records = {"more-metrics": MetricRecord(metrics(1))}
    elif case == "undecodable bytes":
        answer = content(arrays, weights, "hospital-bad")
        answer.array_records["arrays"]["b"] = Array(
            dtype="float64", shape=(3,), stype="numpy.ndarray", data=b"not an npy payload"
        )
        return answer
    else:  # pragma: no cover
        raise AssertionError(case)
    return content(arrays, weights, "hospital-bad", extra_records=extra_records)


# case -> a word the rejection reason must contain
BAD_CASES = {
    "wrong shape": "shape",
    "wrong dtype": "dtype",
    "wrong integer dtype": "dtype",
    "NaN": "NaN",
    "infinite": "infinite",
    "missing array": "names differ",
    "extra array": "names differ",
    "huge norm": "update norm ratio 4.924e+29",  # ||(w, b) x 1e30|| / ||global||, logged
    "norm just over the bound": "update norm ratio 10.0",
    "NaN metric": "metric 'epsilon' must be a finite number",
    "infinite count": "metric 'num-examples' must be a finite number",
    "two ArrayRecords": "ArrayRecord",
    "two MetricRecords": "MetricRecord",
    "undecodable bytes": "cannot be decoded",
}


def _norm(arrays: ArrayRecord) -> float:
    return float(np.sqrt(sum(np.sum(a.numpy().astype(np.float64) ** 2) for a in arrays.values())))
