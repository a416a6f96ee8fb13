"""Phase 1: nodes join, each validates its cohort and releases the DP statistics the plan needs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs import wire
from configs.schema import CohortSchema
from configs.settings import RunSettings
from configs.wire import HandshakeRequest
from models.releases.base import ReleaseError
from models.releases.catalog import get_release, releases_for
from models.releases.counts import HISTOGRAMS, PAIRS
from models.releases.numeric import NUMERIC_MOMENTS
from models.releases.sequence import SEQUENCE_MOMENTS
from models.statistics import Histograms
from server.checkpoint import Checkpoint, CheckpointError
from server.export import HospitalSummary
from strategies.rounds import hospital_of

logger = logging.getLogger(__name__)


class HandshakeError(RuntimeError):
    """No hospital passed the handshake: nothing can be trained, nothing is written."""


@dataclass
class HandshakeResult:
    """Who passed, what each declared, and the merged DP statistics (release name -> statistic)."""

    node_ids: list[int]
    hospitals: dict[int, HospitalSummary]
    statistics: dict[str, Any]
    refusals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reference(self) -> Histograms:
        """Merged DP histograms: the encoder's basis and SA-DQC's column reference."""
        return self.statistics[HISTOGRAMS]

    @property
    def reference_pairs(self) -> Histograms:
        return self.statistics.get(PAIRS, {})

    @property
    def numeric(self) -> np.ndarray | None:
        return self.statistics.get(NUMERIC_MOMENTS)

    @property
    def moments(self) -> Any:
        return self.statistics.get(SEQUENCE_MOMENTS)


class JoinError(RuntimeError):
    """Fewer nodes connected than a run needs, after the join timeout."""


def wait_for_nodes(
    grid: Grid, *, wanted: int, minimum: int, timeout_s: float, report_every_s: float = 10.0
) -> list[int]:
    """Wait until `wanted` nodes are connected, or `timeout_s`, then go on with >= `minimum`.

    The wait is never silent: every `report_every_s` it logs how many nodes it expects and has,
    and on going on with fewer, or stopping, it says so with both numbers.
    """
    started = time.monotonic()
    reported = started
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) >= wanted or now - started > timeout_s:
            break
        if now - reported >= report_every_s:
            logger.info("waiting for nodes: %d of %d expected connected", len(nodes), wanted)
            reported = now
        time.sleep(0.5)
    if len(nodes) < minimum:
        raise JoinError(
            f"expected {wanted} node(s) (federation.hospitals), {len(nodes)} connected after "
            f"{timeout_s:.0f}s (federation.join_timeout_s); at least {minimum} needed "
            "(federation.min_replies)"
        )
    if len(nodes) < wanted:
        logger.warning(
            "expected %d node(s) (federation.hospitals), %d connected after %.0fs: going on with %d",
            wanted,
            len(nodes),
            timeout_s,
            len(nodes),
        )
    return nodes


def _reply_statistics(reply: Message, names: list[str], schema: CohortSchema) -> dict[str, Any]:
    """A hospital's releases, each checked by its own `from_arrays`; ReleaseError names the first bad one."""
    if reply.has_error():
        raise ReleaseError(reply.error.reason)
    content = reply.content
    if wire.METRICS not in content.metric_records:
        raise ReleaseError(f"the reply has no '{wire.METRICS}' record")
    parts = {}
    for name in names:
        record = content.array_records.get(name)
        if record is None:
            raise ReleaseError(f"release '{name}' is missing")
        try:
            parts[name] = get_release(name).from_arrays({k: v.numpy() for k, v in record.items()}, schema)
        except (TypeError, ValueError) as err:  # undecodable arrays, other dtypes: a refusal
            raise ReleaseError(f"release '{name}' is malformed: {err}") from None
    return parts


def _summary(reply: Message, hospital: str) -> HospitalSummary:
    metrics = reply.content.metric_records[wire.METRICS]
    try:
        return HospitalSummary(
            hospital=hospital,
            num_examples=int(metrics[wire.WEIGHT]),
            epsilon=float(metrics["epsilon"]),
            delta=float(metrics["delta"]),
            max_epsilon=float(metrics["max-epsilon"]),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise ReleaseError(f"the reply's metrics are malformed: {err!r}") from None


def run_handshake(
    grid: Grid,
    node_ids: list[int],
    schema: CohortSchema,
    timeout_s: float,
    *,
    releases: list[str],
    federation_id: str = "",
) -> HandshakeResult:
    """Every node validates its data and answers its DP releases; malformed answers are refusals."""
    names = [release.name for release in releases_for(releases)]
    request = HandshakeRequest(schema_hash=schema.schema_hash(), releases=names, federation_id=federation_id)
    content = RecordDict({wire.CONFIG: request.to_config()})
    messages = [Message(content, dst_node_id=n, message_type=wire.HANDSHAKE) for n in node_ids]
    # Sorted by hospital so the merged float sums (and the encoder hash) repeat run to run.
    replies = sorted(grid.send_and_receive(messages, timeout=timeout_s), key=hospital_of)
    hospitals: dict[int, HospitalSummary] = {}
    parts: dict[str, list[Any]] = {name: [] for name in names}
    refusals: list[dict[str, Any]] = []
    for reply in replies:
        node, hospital = reply.metadata.src_node_id, hospital_of(reply)
        try:
            statistics = _reply_statistics(reply, names, schema)
            hospitals[node] = _summary(reply, hospital)
        except ReleaseError as err:
            logger.warning("handshake: %s (node %d) left out: %s", hospital, node, err)
            refusals.append({"hospital": hospital, "node": node, "reason": str(err)})
            continue
        for name, value in statistics.items():
            parts[name].append(value)
    for node in sorted(set(node_ids) - {r.metadata.src_node_id for r in replies}):
        refusals.append({"hospital": f"node-{node}", "node": node, "reason": "no answer before timeout"})
    if not hospitals:
        reasons = "; ".join(f"{r['hospital']}: {r['reason']}" for r in refusals) or "no replies"
        raise HandshakeError(f"no hospital passed the handshake: {reasons}")
    merged = {name: get_release(name).merge(values) for name, values in parts.items()}
    return HandshakeResult(sorted(hospitals), hospitals, merged, refusals)


def identify_nodes(grid: Grid, node_ids: list[int], timeout_s: float) -> dict[int, str]:
    """node id -> hospital name, asked with `query.identify` (no data read, no epsilon spent)."""
    messages = [
        Message(RecordDict({wire.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=wire.IDENTIFY)
        for n in node_ids
    ]
    replies = grid.send_and_receive(messages, timeout=timeout_s)
    return {r.metadata.src_node_id: hospital_of(r) for r in replies if not r.has_error()}


def resumed_handshake(
    grid: Grid, node_ids: list[int], checkpoint: Checkpoint, settings: RunSettings
) -> HandshakeResult:
    """The checkpointed handshake, re-keyed to the node ids the hospitals have now."""
    saved = checkpoint.progress
    summaries = saved.hospital_summaries()
    names = identify_nodes(grid, node_ids, settings.federation.round_timeout_s)
    nodes = {node: summaries[name] for node, name in sorted(names.items()) if name in summaries}
    if len(nodes) < settings.federation.min_replies:
        raise CheckpointError(
            f"resume: {len(nodes)} of the checkpointed hospitals {sorted(summaries)} answered "
            f"(online: {sorted(names.values())}); quorum is {settings.federation.min_replies}"
        )
    missing = sorted(set(summaries) - {s.hospital for s in nodes.values()})
    if missing:
        logger.warning("resume: hospitals %s are not online; the run goes on without them", missing)
    schema = settings.load_schema()
    statistics = {
        name: get_release(name).from_arrays(checkpoint.statistics(name), schema) for name in saved.releases
    }
    return HandshakeResult(sorted(nodes), nodes, statistics, saved.refusals)
