"""FedAvg weighted by num-examples that drops malformed updates, waits for a bounded quorum, resumes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from strategies.validation import check_update

logger = logging.getLogger(__name__)

NODE_INFO_KEY = "node-info"
# Names one federated run across a crash and its resume; nodes key their privacy plans by it.
FEDERATION_ID = "federation-id"


@dataclass
class RoundLog:
    """Who took part in a round, what each reported, and what was refused and why."""

    server_round: int
    accepted: list[dict] = field(default_factory=list)
    stage: str = ""
    rejected: list[dict] = field(default_factory=list)
    aggregated: bool = False


class QuorumError(RuntimeError):
    """Fewer participating hospitals online than a round needs, for longer than the run tolerates."""


def hospital_of(message: Message) -> str:
    """The hospital name a node reports, falling back to its Flower node id."""
    if message.has_content() and NODE_INFO_KEY in message.content.config_records:
        return str(message.content.config_records[NODE_INFO_KEY].get("hospital", ""))
    return f"node-{message.metadata.src_node_id}"


def sum_metricrecords(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Mergeable sums and counts: add every metric; epsilon is per hospital, so take the max."""
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


class ValidatedFedAvg(FedAvg):
    """Flower's FedAvg on `train.<action>` messages, after `check_update` on each reply.

    A malformed update (wrong names, shapes or dtypes, non-finite values, bad weight) is
    logged with the hospital and left out; the round goes on with the rest as long as at
    least `min_replies` valid updates arrived, else the global model stays as it was.

    Dropout: a round goes to the participants online when it starts. A node that dies
    mid-round is answered for by the SuperLink (an error reply once its heartbeat lapses) or
    by the round timeout, and the round aggregates what arrived. Flower's own node sampling
    waits forever for enough nodes; here the wait is bounded by `quorum_timeout_s` and ends in
    a `QuorumError` that says who is missing. A node that comes back keeps its node id (its
    key's registration) and is sent the next round.
    """

    def __init__(
        self, *, action: str, min_replies: int = 1, quorum_timeout_s: float = 600.0, **kwargs
    ) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("train_metrics_aggr_fn", sum_metricrecords)
        super().__init__(**kwargs)
        if not action.isidentifier():
            raise ValueError(f"action must be a Python identifier (Flower message routing), got {action!r}")
        self.action = action
        self.min_replies = min_replies
        self.quorum_timeout_s = quorum_timeout_s
        self.rounds: list[RoundLog] = []
        self._reference: ArrayRecord | None = None
        # Nodes that passed the handshake; None means every connected node may train.
        self.participants: set[int] | None = None
        # Weights to send instead of the last aggregate (a quality controller's rollback).
        self.override_arrays: ArrayRecord | None = None
        # node id -> hospital, from the handshake: names a node that cannot answer for itself.
        self.hospital_names: dict[int, str] = {}
        self._sent: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.override_arrays is not None:
            arrays, self.override_arrays = self.override_arrays, None
        self._reference = arrays
        config["server-round"] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self._sent = [
            Message(content=content, dst_node_id=node, message_type=f"train.{self.action}")
            for node in self.wait_for_quorum(grid, server_round)
        ]
        return self._sent

    def wait_for_quorum(self, grid: Grid, server_round: int) -> list[int]:
        """The participants online now, once at least `min_replies` are; bounded by the timeout."""
        deadline = time.monotonic() + self.quorum_timeout_s
        while True:
            online = sorted(n for n in grid.get_node_ids() if self._participates(n))
            if len(online) >= self.min_replies:
                return online
            if time.monotonic() >= deadline:
                missing = sorted(self.participants - set(online)) if self.participants else []
                raise QuorumError(
                    f"train.{self.action} round {server_round}: {len(online)} participating "
                    f"hospital(s) online after {self.quorum_timeout_s:.0f}s, quorum is {self.min_replies}"
                    + (f"; offline node ids: {missing}" if missing else "")
                    + ". The last completed round is checkpointed: restart the missing SuperNodes"
                    " and rerun with resume=true."
                )
            logger.info(
                "round %d: %d participant(s) online, waiting for %d",
                server_round,
                len(online),
                self.min_replies,
            )
            time.sleep(1.0)

    def _participates(self, node: int) -> bool:
        return self.participants is None or node in self.participants

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        after_round: Callable[[int, ArrayRecord], None] | None = None,
    ) -> Result:
        """Flower's round loop (train, aggregate, server-side evaluate), able to start mid-way.

        `first_round` > 1 resumes a checkpointed run: `initial_arrays` are the weights the
        checkpoint says round `first_round` starts from. `after_round(r, arrays)` runs when
        round r is complete, with the weights round r + 1 will be sent (a rollback included):
        that is what a checkpoint must hold. Client-side evaluation is off in this strategy.
        """
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result()
        arrays = initial_arrays
        if evaluate_fn is not None and first_round == 1:
            evaluate_fn(0, initial_arrays)
        for server_round in range(first_round, num_rounds + 1):
            logger.info("train.%s round %d/%d", self.action, server_round, num_rounds)
            replies = grid.send_and_receive(
                self.configure_train(server_round, arrays, train_config, grid), timeout=timeout
            )
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            if evaluate_fn is not None and (scores := evaluate_fn(server_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = scores
            if after_round is not None:
                after_round(server_round, self.override_arrays or arrays)
        return result

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._reference is not None, "configure_train must run first"
        log = RoundLog(server_round)
        self.rounds.append(log)
        # Sorted by hospital: float sums in arrival order would make runs differ in the last bits.
        accepted = sorted((m for m in replies if self._accept(m, log)), key=hospital_of)
        if len(accepted) < self.min_replies:
            logger.warning(
                "round %d: %d valid update(s), quorum is %d; global model unchanged",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        # Aggregate directly: each reply was checked on its own, and metric sets may differ
        # between hospitals (Flower's all-replies-alike check would fail the whole round).
        contents = [m.content for m in accepted]
        arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        log.aggregated = True
        return _cast_like(arrays, self._reference), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def _sender(self, message: Message) -> tuple[str, int]:
        """(hospital, node id) of a reply; the SuperLink answers for a node it lost (an error
        reply from the SuperLink itself), so that one is traced back to the node it was sent to."""
        node = message.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:
            sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
            node = sent_to.get(message.metadata.reply_to_message_id, node)
        if message.has_content() and NODE_INFO_KEY in message.content.config_records:
            return hospital_of(message), node
        return self.hospital_names.get(node, f"node-{node}"), node

    def _accept(self, message: Message, log: RoundLog) -> bool:
        hospital, node = self._sender(message)
        if message.has_error():
            reason = message.error.reason
            logger.warning(
                "round %d: %s (node %d) sent an error: %s", log.server_round, hospital, node, reason
            )
            log.rejected.append({"hospital": hospital, "node": node, "reason": reason})
            return False
        problem = check_update(message.content, self._reference, weight_key=self.weighted_by_key)
        if problem is not None:
            logger.warning(
                "round %d: rejected update from %s (node %d): %s",
                log.server_round,
                hospital,
                node,
                problem,
            )
            log.rejected.append({"hospital": hospital, "node": node, "reason": problem})
            return False
        metrics = next(iter(message.content.metric_records.values()))
        log.accepted.append({"hospital": hospital, "node": node, **dict(metrics)})
        return True


def _cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Averaging promotes integer buffers (e.g. BatchNorm counters) to float: cast back."""
    out = {}
    for name, value in arrays.items():
        want = reference[name].numpy().dtype
        data = value.numpy()
        if data.dtype != want:
            data = np.rint(data) if np.issubdtype(want, np.integer) else data
            data = data.astype(want)
        out[name] = Array(np.array(data, order="C"))  # keeps 0-d arrays 0-d
    return ArrayRecord(out)
