"""A statistics generator's measurement rounds: hospitals release noisy tables, the server sums them."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from configs import wire
from configs.wire import MeasureRequest, finite_metric
from models.pgm.marginals import clique_key, clique_of, marginals_problem
from server.handshake import HandshakeResult
from server.plan import Stage
from strategies.rounds import hospital_of

logger = logging.getLogger(__name__)


def _reply_tables(
    reply: Message, request: MeasureRequest, schema: Any, cell_bound: float
) -> tuple[dict[str, np.ndarray], float, float]:
    """A hospital's noisy tables, noise multiplier and epsilon, or ValueError naming what is wrong."""
    if reply.has_error():
        raise ValueError(reply.error.reason)
    record = reply.content.array_records.get(wire.ARRAYS)
    metrics = reply.content.metric_records.get(wire.METRICS)
    if record is None or metrics is None:
        raise ValueError("the reply lacks its tables or metrics")
    try:
        tables = {key: np.asarray(value.numpy(), dtype=np.float64) for key, value in record.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"the tables cannot be decoded as numbers: {err}") from None
    cliques = [clique_of(k) for k in request.cliques]
    problem = marginals_problem(tables, schema, cliques, request.table_cells)
    if problem is not None:
        raise ValueError(problem)
    # a count table's cells are bounded (`server.handshake.count_cell_bound`): two cells of 1e308
    # would otherwise make the sums infinite for every hospital
    huge = [key for key, table in tables.items() if np.abs(table).max(initial=0.0) > cell_bound]
    if huge:
        raise ValueError(f"marginal table '{huge[0]}' has a cell beyond {cell_bound:g}")
    z, epsilon = (finite_metric(metrics, key) for key in ("noise-multiplier", "epsilon"))
    if z <= 0 or epsilon < 0:
        raise ValueError(f"'noise-multiplier' {z} must be positive and 'epsilon' {epsilon} not negative")
    return tables, z, epsilon


def _measurement_round(
    grid: Grid,
    request: MeasureRequest,
    handshake: HandshakeResult,
    schema: Any,
    *,
    timeout_s: float,
    cell_bound: float,
) -> tuple[dict[str, np.ndarray], float, list[dict[str, Any]]]:
    """(summed tables, per-cell noise sd of the sums, refusals) of one round; each answering
    hospital's epsilon (its accountant's, all charges so far) is kept in the handshake's summary."""
    node_ids = handshake.node_ids
    content = RecordDict({wire.CONFIG: request.to_config()})
    messages = [Message(content, dst_node_id=n, message_type=wire.MEASURE) for n in node_ids]
    replies = sorted(grid.send_and_receive(messages, timeout=timeout_s), key=hospital_of)
    total: dict[str, np.ndarray] = {}
    variance, refusals = 0.0, []
    for reply in replies:
        try:
            tables, z, epsilon = _reply_tables(reply, request, schema, cell_bound)
        except (TypeError, ValueError) as err:
            logger.warning("measurement: %s left out: %s", hospital_of(reply), err)
            refusals.append(
                {"hospital": hospital_of(reply), "round": request.round_index, "reason": str(err)}
            )
            continue
        summary = handshake.hospitals.get(reply.metadata.src_node_id)
        if summary is not None:
            summary.epsilon = max(summary.epsilon, epsilon)
        for key, table in tables.items():
            total[key] = total.get(key, 0.0) + table.astype(np.float64)
        # one Gaussian release of k tables: sigma = z sqrt(k) per cell; the sums' variances add
        variance += (z * math.sqrt(len(tables))) ** 2
    return total, math.sqrt(variance), refusals


def run_measurements(
    grid: Grid,
    stage: Stage,
    handshake: HandshakeResult,
    *,
    timeout_s: float,
    federation_id: str,
    cell_bound: float,
) -> list[dict[str, Any]]:
    """Every measurement round the model plans, then its fit; returns the hospitals' refusals."""
    model = stage.model
    schema = model.encoder.schema
    weights = list(model.measurement_weights())
    refusals: list[dict[str, Any]] = []
    for index in range(1, len(weights) + 1):
        cliques = model.select_measurements(index, handshake.statistics)
        if not cliques:  # e.g. "aim" found nothing worth measuring: this round's budget stays unspent
            logger.info("%s: round %d has nothing to measure", stage.label, index)
            continue
        request = MeasureRequest(
            model=model.registry_name,
            cliques=[clique_key(c) for c in cliques],
            round_index=index,
            weights=weights,
            budget_share=stage.budget_share,
            federation_id=federation_id,
            table_cells=model.measurement_table_cells(index),
        )
        tables, noise_sd, refused = _measurement_round(
            grid, request, handshake, schema, timeout_s=timeout_s, cell_bound=cell_bound
        )
        refusals += refused
        if not tables:
            raise RuntimeError(f"{stage.label}: no hospital answered measurement round {index}: {refused}")
        logger.info(
            "%s: round %d summed %d tables (noise sd %.1f)", stage.label, index, len(tables), noise_sd
        )
        model.observe(tables, noise_sd)
    model.fit_statistics({name: handshake.statistics[name] for name in model.releases})
    return refusals
