"""Phase 1: nodes join, each validates its cohort and releases the DP statistics the plan needs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs import wire
from configs.schema import CohortSchema
from configs.settings import RunSettings
from configs.wire import HandshakeRequest, WireError, finite_metric
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

# A real count cell holds at most a hospital's patients plus Gaussian noise. The factor leaves
# room for a hospital larger than the public cap `federation.max_hospital_weight` (its weight is
# merely clipped to the cap); the noise room is far beyond any honest draw: sigma per cell is
# z * sqrt(tables), a few thousand even at a tiny epsilon (z ~ 500 at epsilon 0.01, 45 pair
# tables: sigma ~ 3400), so 1e6 is > 250 sigma. A cell beyond that is no count, and two cells of
# 1e308 would overflow the merged sum to inf (and the marginal to NaN).
COUNT_CELL_FACTOR = 10.0
COUNT_NOISE_ROOM = 1e6
# Moments (numeric, sequence) are on the columns' own scale and have no count-sized bound; this
# one only keeps their sum over up to 1000 hospitals (federation.hospitals), and its square, finite.
MOMENT_VALUE_BOUND = 1e100
COUNT_RELEASES = (HISTOGRAMS, PAIRS)
# A node may only lower the run's privacy.max_epsilon, whose own ceiling (PrivacySettings) is 100.
MAX_EPSILON_CEILING = 100.0
# The ledger lets a charge land up to 1e-9 above max epsilon (float rounding); allow that, no more.
EPSILON_SLACK = 1e-6


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


def count_cell_bound(max_hospital_weight: float) -> float:
    """The largest |cell| a hospital's count table (histograms, pairs) may hold."""
    return COUNT_CELL_FACTOR * max_hospital_weight + COUNT_NOISE_ROOM


def dp_weight(histograms: Histograms, max_hospital_weight: float) -> float:
    """A hospital's FedAvg weight: its noisy column totals averaged, clipped to [1, the cap]."""
    # Every column's noisy histogram sums to n plus that column's noise; averaging the columns'
    # totals shrinks the noise. Post-processing of the released histograms: no extra epsilon.
    totals = [float(np.sum(counts)) for counts in histograms.values()]
    return float(np.clip(np.mean(totals) if totals else 1.0, 1.0, max_hospital_weight))


def _accountant(content: RecordDict) -> tuple[float, float, float]:
    """(epsilon, delta, max epsilon) the hospital declares, each finite and in its range."""
    if wire.METRICS not in content.metric_records:
        raise ReleaseError(f"the reply has no '{wire.METRICS}' record")
    metrics = content.metric_records[wire.METRICS]
    try:
        epsilon, delta, max_epsilon = (finite_metric(metrics, k) for k in ("epsilon", "delta", "max-epsilon"))
    except WireError as err:
        raise ReleaseError(f"the reply's metrics are malformed: {err}") from None
    ranges = [
        (
            0 < max_epsilon <= MAX_EPSILON_CEILING,
            f"max-epsilon {max_epsilon:g} not in (0, {MAX_EPSILON_CEILING:g}]",
        ),
        (0 < delta < 1, f"delta {delta:g} not in (0, 1)"),
        (0 <= epsilon <= max_epsilon + EPSILON_SLACK, f"epsilon {epsilon:g} not in [0, max-epsilon]"),
    ]
    for within, problem in ranges:
        if not within:
            raise ReleaseError(f"the reply's metrics are malformed: {problem}")
    return epsilon, delta, max_epsilon


def _release(name: str, record: ArrayRecord, schema: CohortSchema, bound: float) -> Any:
    """One release back from the wire, its values finite and within `bound`; else ReleaseError."""
    release = get_release(name)
    try:
        value = release.from_arrays({k: v.numpy() for k, v in record.items()}, schema)
        arrays = release.to_arrays(value)
    except ReleaseError:
        raise
    except Exception as err:  # undecodable bytes, other dtypes: a refusal, never a crash
        raise ReleaseError(f"release '{name}' is malformed: {err}") from None
    for key, array in arrays.items():
        values = np.asarray(array, dtype=np.float64)
        if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > bound:
            raise ReleaseError(f"release '{name}' part '{key}' has values beyond |{bound:g}| or non-finite")
    return value


def check_reply(
    reply: Message, names: list[str], schema: CohortSchema, *, max_hospital_weight: float
) -> tuple[HospitalSummary, dict[str, Any]]:
    """A hospital's summary (its DP weight) and releases; ReleaseError names the first problem."""
    if reply.has_error():
        raise ReleaseError(reply.error.reason)
    content = reply.content
    epsilon, delta, max_epsilon = _accountant(content)
    statistics = {}
    for name in names:
        record = content.array_records.get(name)
        if record is None:
            raise ReleaseError(f"release '{name}' is missing")
        bound = count_cell_bound(max_hospital_weight) if name in COUNT_RELEASES else MOMENT_VALUE_BOUND
        statistics[name] = _release(name, record, schema, bound)
    weight = dp_weight(statistics[HISTOGRAMS], max_hospital_weight)
    summary = HospitalSummary(hospital_of(reply), weight, epsilon, delta, max_epsilon)
    return summary, statistics


def collect_replies(
    replies: list[Message],
    node_ids: list[int],
    names: list[str],
    schema: CohortSchema,
    *,
    max_hospital_weight: float,
) -> HandshakeResult:
    """Check every reply, merge the passing hospitals' releases; the rest become `refusals`."""
    hospitals: dict[int, HospitalSummary] = {}
    parts: dict[str, list[Any]] = {name: [] for name in names}
    refusals: list[dict[str, Any]] = []
    # Sorted by hospital so the merged float sums (and the encoder hash) repeat run to run.
    for reply in sorted(replies, key=hospital_of):
        node, hospital = reply.metadata.src_node_id, hospital_of(reply)
        try:
            if any(h.hospital == hospital for h in hospitals.values()):
                # weights are keyed by hospital name in training: one name, one node
                raise ReleaseError(f"another node already answered as '{hospital}'")
            summary, statistics = check_reply(reply, names, schema, max_hospital_weight=max_hospital_weight)
        except ReleaseError as err:
            logger.warning("handshake: %s (node %d) left out: %s", hospital, node, err)
            refusals.append({"hospital": hospital, "node": node, "reason": str(err)})
            continue
        hospitals[node] = summary
        for name, value in statistics.items():
            parts[name].append(value)
    for node in sorted(set(node_ids) - {r.metadata.src_node_id for r in replies}):
        refusals.append({"hospital": f"node-{node}", "node": node, "reason": "no answer before timeout"})
    if not hospitals:
        reasons = "; ".join(f"{r['hospital']}: {r['reason']}" for r in refusals) or "no replies"
        raise HandshakeError(f"no hospital passed the handshake: {reasons}")
    merged = {name: get_release(name).merge(values) for name, values in parts.items()}
    return HandshakeResult(sorted(hospitals), hospitals, merged, refusals)


def run_handshake(
    grid: Grid,
    node_ids: list[int],
    schema: CohortSchema,
    timeout_s: float,
    *,
    releases: list[str],
    max_hospital_weight: float,
    federation_id: str = "",
) -> HandshakeResult:
    """Every node validates its data and answers its DP releases; malformed answers are refusals."""
    names = [release.name for release in releases_for(releases)]
    request = HandshakeRequest(schema_hash=schema.schema_hash(), releases=names, federation_id=federation_id)
    content = RecordDict({wire.CONFIG: request.to_config()})
    messages = [Message(content, dst_node_id=n, message_type=wire.HANDSHAKE) for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    return collect_replies(replies, node_ids, names, schema, max_hospital_weight=max_hospital_weight)


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
