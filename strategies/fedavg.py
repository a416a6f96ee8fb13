"""FedAvg weighted by num-examples that drops malformed updates and answers a quorum."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from strategies.validation import check_update

logger = logging.getLogger(__name__)

NODE_INFO_KEY = "node-info"


@dataclass
class RoundLog:
    """Who took part in a round, what each reported, and what was refused and why."""

    server_round: int
    accepted: list[dict] = field(default_factory=list)
    stage: str = ""
    rejected: list[dict] = field(default_factory=list)
    aggregated: bool = False


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
    """

    def __init__(self, *, action: str, min_replies: int = 1, **kwargs) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("train_metrics_aggr_fn", sum_metricrecords)
        super().__init__(**kwargs)
        if not action.isidentifier():
            raise ValueError(f"action must be a Python identifier (Flower message routing), got {action!r}")
        self.action = action
        self.min_replies = min_replies
        self.rounds: list[RoundLog] = []
        self._reference: ArrayRecord | None = None
        # Nodes that passed the handshake; None means every connected node may train.
        self.participants: set[int] | None = None
        # Weights to send instead of the last aggregate (a quality controller's rollback).
        self.override_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.override_arrays is not None:
            arrays, self.override_arrays = self.override_arrays, None
        self._reference = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        return [
            Message(
                content=m.content,
                dst_node_id=m.metadata.dst_node_id,
                message_type=f"train.{self.action}",
            )
            for m in messages
            if self.participants is None or m.metadata.dst_node_id in self.participants
        ]

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

    def _accept(self, message: Message, log: RoundLog) -> bool:
        hospital, node = hospital_of(message), message.metadata.src_node_id
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
