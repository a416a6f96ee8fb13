"""A wrapper around any Flower strategy that checks every reply before the inner strategy aggregates."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore.run import Run

from configs.wire import NODE_INFO as NODE_INFO_KEY
from strategies.aggregation import cast_like, sum_metricrecords
from strategies.rounds import QuorumError, RoundLog, hospital_of
from strategies.validation import DEFAULT_MAX_UPDATE_NORM_RATIO, check_update

logger = logging.getLogger(__name__)

# Sampling knobs of Flower's FedAvg family that make `sample_nodes` wait (unbounded) for nodes.
_BLOCKING_MINIMA = ("min_train_nodes", "min_available_nodes")


class ValidatingStrategy(Strategy):
    """`inner` (FedAvg, FedProx, FedAdam, ...) on `train.<action>` messages, after `check_update`.

    The wrapper owns who is asked and what is accepted; the inner strategy owns the config it
    adds (FedProx's `proximal-mu`) and the arithmetic of the new global model (FedAdam's
    server-side optimiser). A malformed update (wrong names, shapes or dtypes, non-finite
    values, a norm beyond the bound, a hospital without a weight) is logged with the hospital
    and never reaches the inner strategy; the round goes on with the rest as long as at least
    `min_replies` valid updates arrived, else the global model stays as it was.

    Each update is weighed by the server's own figure for its hospital (`weights`: the DP count
    from the handshake, capped), never by a count in the reply: a node cannot claim to be huge.

    Dropout: a round goes to the participants online when it starts. A node that dies
    mid-round is answered for by the SuperLink (an error reply once its heartbeat lapses) or by
    the round timeout, and the round aggregates what arrived. Flower's own node sampling waits
    forever for enough nodes; here the wait is bounded by `quorum_timeout_s` and ends in a
    `QuorumError` that says who is missing. A node that comes back keeps its node id (its key's
    registration) and is sent the next round.

    Args:
        inner: the Flower strategy that configures and aggregates. Its blocking sampling minima
            (`min_train_nodes`, `min_available_nodes`) are lowered to 1: the quorum wait here
            replaces them. Its own evaluation is never used (client-side evaluation is off).
        action: the ClientApp route; messages are sent as `train.<action>`.
        weights: hospital name -> its FedAvg weight (positive, finite), from the handshake.
        min_replies: valid updates a round needs, and participants online it waits for.
        quorum_timeout_s: how long a round may wait for `min_replies` participants to be online.
        max_update_norm_ratio: an update farther than this times max(||global||, 1) from the
            weights sent that round is refused (`check_update`).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        action: str,
        weights: Mapping[str, float],
        min_replies: int = 1,
        quorum_timeout_s: float = 600.0,
        max_update_norm_ratio: float = DEFAULT_MAX_UPDATE_NORM_RATIO,
    ) -> None:
        super().__init__()
        bad = {name: w for name, w in weights.items() if not (math.isfinite(w) and w > 0)}
        if not weights or bad:
            raise ValueError(f"weights must map hospitals to positive finite numbers, got {dict(weights)}")
        if not (math.isfinite(max_update_norm_ratio) and max_update_norm_ratio > 0):
            raise ValueError(
                f"max_update_norm_ratio must be positive and finite, got {max_update_norm_ratio}"
            )
        if not action.isidentifier():
            raise ValueError(f"action must be a Python identifier (Flower message routing), got {action!r}")
        if min_replies < 1:
            raise ValueError(f"min_replies must be at least 1, got {min_replies}")
        if getattr(inner, "fraction_train", 1.0) == 0.0:
            raise ValueError(f"{type(inner).__name__} has fraction_train=0: it would train no node")
        self.inner = inner
        self.action = action
        self.min_replies = min_replies
        self.quorum_timeout_s = quorum_timeout_s
        self.weights = {str(name): float(w) for name, w in weights.items()}
        self.max_update_norm_ratio = max_update_norm_ratio
        self.weighted_by_key = str(getattr(inner, "weighted_by_key", "num-examples"))
        self.rounds: list[RoundLog] = []
        # Nodes that passed the handshake; None means every connected node may train.
        self.participants: set[int] | None = None
        # Weights to send instead of the last aggregate (a quality controller's rollback).
        self.override_arrays: ArrayRecord | None = None
        # node id -> hospital, from the handshake: names a node that cannot answer for itself.
        self.hospital_names: dict[int, str] = {}
        self._reference: ArrayRecord | None = None
        self._sent: list[Message] = []
        # Flower's loop counts rounds from 1; a resumed run adds this to get the real round.
        self._round_offset = 0
        for name in _BLOCKING_MINIMA:
            if getattr(inner, name, 0) > 1:
                logger.info("%s.%s lowered to 1: the quorum wait bounds it", type(inner).__name__, name)
                setattr(inner, name, 1)

    def summary(self) -> None:
        """Log the wrapper's settings, then the inner strategy's."""
        logger.info(
            "ValidatingStrategy: train.%s, at least %d valid update(s), quorum wait <= %.0fs, inner %s",
            self.action,
            self.min_replies,
            self.quorum_timeout_s,
            type(self.inner).__name__,
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's training content, sent as `train.<action>` to every participant online.

        A pending `override_arrays` (rollback) replaces `arrays`. The inner strategy samples from
        the online participants only, so its sampling never waits; its content is kept per node
        where it addressed that node, else its first message's content is used.
        """
        server_round += self._round_offset
        if self.override_arrays is not None:
            arrays, self.override_arrays = self.override_arrays, None
        self._reference = arrays
        online = self.wait_for_quorum(grid, server_round)
        config["server-round"] = server_round
        planned = list(self.inner.configure_train(server_round, arrays, config, _OnlineGrid(grid, online)))
        if not planned:
            logger.warning("round %d: %s configured no training", server_round, type(self.inner).__name__)
            self._sent = []
            return []
        by_node = {m.metadata.dst_node_id: m.content for m in planned}
        logger.info("train.%s round %d: %d participant(s)", self.action, server_round, len(online))
        self._sent = [
            Message(
                content=by_node.get(node, planned[0].content),
                dst_node_id=node,
                message_type=f"train.{self.action}",
            )
            for node in online
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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, let the inner strategy aggregate the valid ones; log both in `rounds`.

        The inner strategy sees canonical contents only (the update's arrays and a MetricRecord
        holding just the hospital's weight from `weights`), sorted by hospital: float sums in
        arrival order would make runs differ in the last bits, and hospitals may report
        different metric sets. The merged metrics are `sum_metricrecords` over the full accepted
        replies, their weight the sum of the weights used.
        """
        assert self._reference is not None, "configure_train must run first"
        server_round += self._round_offset
        log = RoundLog(server_round)
        self.rounds.append(log)
        weighed = [(m, w) for m in replies if (w := self._accept(m, log)) is not None]
        accepted = sorted(weighed, key=lambda pair: hospital_of(pair[0]))
        if len(accepted) < self.min_replies:
            logger.warning(
                "round %d: %d valid update(s), quorum is %d; global model unchanged",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        arrays, _ = self.inner.aggregate_train(server_round, [self._canonical(m, w) for m, w in accepted])
        if arrays is None:
            inner = type(self.inner).__name__
            logger.warning("round %d: %s aggregated nothing; global model unchanged", server_round, inner)
            return None, None
        log.aggregated = True
        merged = sum_metricrecords([m.content for m, _ in accepted], self.weighted_by_key)
        merged[self.weighted_by_key] = sum(w for _, w in accepted)
        return cast_like(arrays, self._reference), merged

    def _canonical(self, message: Message, weight: float) -> Message:
        """The reply as the inner strategy may see it: its arrays and the server's weight for it."""
        arrays = next(iter(message.content.array_records.values()))
        content = RecordDict(
            {
                str(getattr(self.inner, "arrayrecord_key", "arrays")): arrays,
                "metrics": MetricRecord({self.weighted_by_key: weight}),
            }
        )
        return Message(metadata=message.metadata, content=content)

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

    def _accept(self, message: Message, log: RoundLog) -> float | None:
        """The reply's weight if it may enter the average; None (logged, recorded) if refused."""
        hospital, node = self._sender(message)
        if message.has_error():
            reason = message.error.reason
            logger.warning(
                "round %d: %s (node %d) sent an error: %s", log.server_round, hospital, node, reason
            )
            log.rejected.append({"hospital": hospital, "node": node, "reason": reason})
            return None
        assert self._reference is not None
        # The handshake's name for this node id, not the name the reply claims: a node cannot
        # take another hospital's weight by naming itself after it.
        weight = self.weights.get(self.hospital_names.get(node, hospital))
        problem = check_update(message.content, self._reference, max_norm_ratio=self.max_update_norm_ratio)
        if problem is None and weight is None:
            problem = f"no handshake weight for {self.hospital_names.get(node, hospital)}"
        if problem is not None:
            logger.warning(
                "round %d: rejected update from %s (node %d): %s",
                log.server_round,
                hospital,
                node,
                problem,
            )
            log.rejected.append({"hospital": hospital, "node": node, "reason": problem})
            return None
        metrics = next(iter(message.content.metric_records.values()))
        # the weight used, not any count the reply may carry (the log reaches metrics.json)
        log.accepted.append(
            {"hospital": hospital, "node": node, **dict(metrics), self.weighted_by_key: weight}
        )
        return weight

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: the server scores the model (`evaluate_fn`)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """No client-side evaluation, so nothing to aggregate."""
        return None

    def start(
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

        Runs Flower's own `Strategy.start` for the rounds left, with real round numbers seen by
        configure/aggregate, the inner strategy, `evaluate_fn`, `after_round` and the Result.

        Args:
            first_round: > 1 resumes a checkpointed run: `initial_arrays` are the weights the
                checkpoint says round `first_round` starts from; there is no round-0 evaluation.
            after_round: `after_round(r, arrays)` runs when round r is complete (after
                `evaluate_fn`), with the weights round r + 1 will be sent (a rollback included):
                that is what a checkpoint must hold.
        """
        if first_round < 1:
            raise ValueError(f"first_round must be at least 1, got {first_round}")
        offset = first_round - 1

        def evaluate(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if local_round == 0:  # the starting weights: scored on a fresh run only
                return evaluate_fn(0, arrays) if evaluate_fn is not None and offset == 0 else None
            server_round = local_round + offset
            scores = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
            if after_round is not None:
                pending = self.override_arrays
                after_round(server_round, pending if pending is not None else arrays)
            return scores

        self._round_offset = offset
        try:
            rounds_left = max(0, num_rounds - offset)
            result = super().start(
                grid, initial_arrays, rounds_left, timeout, train_config, evaluate_config, evaluate
            )
        finally:
            self._round_offset = 0
        for history in (
            result.train_metrics_clientapp,
            result.evaluate_metrics_clientapp,
            result.evaluate_metrics_serverapp,
        ):
            shifted = {(r + offset if r > 0 else r): m for r, m in history.items()}
            history.clear()
            history.update(shifted)
        return result


class _OnlineGrid(Grid):
    """The run's Grid as an inner strategy samples it: only the given nodes, and no sending."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run: Run) -> None:
        raise RuntimeError("the inner strategy may not change the run")

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise RuntimeError("the inner strategy may not send: ValidatingStrategy sends")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise RuntimeError("the inner strategy may not receive: ValidatingStrategy receives")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise RuntimeError("the inner strategy may not send: ValidatingStrategy sends")
