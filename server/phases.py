"""The phases of a federated run over Flower's Grid: handshake, training, synthesis, export."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.progress import Progress

from configs.schema import CohortSchema
from configs.settings import RunSettings
from models.encoder import TabularEncoder
from models.registry import get_model_class
from models.statistics import Histograms, column_shape_vs_reference, mean_score, merge_histograms
from server.export import HospitalSummary, export_run
from strategies.fedavg import ValidatedFedAvg, hospital_of

logger = logging.getLogger(__name__)


class HandshakeError(RuntimeError):
    """No hospital passed the handshake: nothing can be trained, nothing is written."""


@dataclass
class HandshakeResult:
    node_ids: list[int]
    hospitals: dict[int, HospitalSummary]
    reference: Histograms
    refusals: list[dict[str, Any]] = field(default_factory=list)


def wait_for_nodes(grid: Grid, *, wanted: int, minimum: int, timeout_s: float) -> list[int]:
    """Wait until `wanted` nodes are connected, or `timeout_s`, then go on with >= minimum."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(nodes) < minimum:
        raise RuntimeError(
            f"only {len(nodes)} node(s) connected after {timeout_s:.0f}s; at least {minimum} needed"
        )
    return nodes


def _histograms_problem(record: ArrayRecord, schema: CohortSchema) -> str | None:
    """Shape and finiteness check on a hospital's DP histograms before they are merged."""
    for spec in schema.columns:
        if spec.name not in record:
            return f"histogram of '{spec.name}' is missing"
        counts = record[spec.name].numpy()
        if counts.shape != (spec.n_cells(),) or not np.isfinite(counts).all():
            return f"histogram of '{spec.name}' is malformed (shape {counts.shape})"
    return None


def run_handshake(grid: Grid, node_ids: list[int], schema: CohortSchema, timeout_s: float) -> HandshakeResult:
    """Phase 1: every node validates its data and answers counts + DP histograms."""
    content = RecordDict({"config": ConfigRecord({"schema-hash": schema.schema_hash()})})
    messages = [Message(content, dst_node_id=n, message_type="query.handshake") for n in node_ids]
    # Sorted by hospital so the merged float sums (and the encoder hash) repeat run to run.
    replies = sorted(grid.send_and_receive(messages, timeout=timeout_s), key=hospital_of)
    accepted: list[int] = []
    hospitals: dict[int, HospitalSummary] = {}
    parts: list[Histograms] = []
    refusals: list[dict[str, Any]] = []
    for reply in replies:
        node, hospital = reply.metadata.src_node_id, hospital_of(reply)
        if reply.has_error():
            problem = reply.error.reason
        else:
            problem = _histograms_problem(reply.content.array_records["histograms"], schema)
        if problem is not None:
            logger.warning("handshake: %s (node %d) left out: %s", hospital, node, problem)
            refusals.append({"hospital": hospital, "node": node, "reason": problem})
            continue
        metrics = reply.content.metric_records["metrics"]
        hospitals[node] = HospitalSummary(
            hospital=hospital,
            num_examples=int(metrics["num-examples"]),
            epsilon=float(metrics["epsilon"]),
            delta=float(metrics["delta"]),
            max_epsilon=float(metrics["max-epsilon"]),
        )
        parts.append({k: v.numpy() for k, v in reply.content.array_records["histograms"].items()})
        accepted.append(node)
    silent = sorted(set(node_ids) - {r.metadata.src_node_id for r in replies})
    for node in silent:
        refusals.append({"hospital": f"node-{node}", "node": node, "reason": "no answer before timeout"})
    if not accepted:
        reasons = "; ".join(f"{r['hospital']}: {r['reason']}" for r in refusals) or "no replies"
        raise HandshakeError(f"no hospital passed the handshake: {reasons}")
    return HandshakeResult(accepted, hospitals, merge_histograms(parts), refusals)


def _round_scorer(model: Any, reference: Histograms, settings: RunSettings, progress: Progress, task: Any):
    """Server-side evaluation after each round: column shapes vs the DP reference histograms."""
    schema = model.encoder.schema

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        sample = model.sample(settings.export.round_sample_rows, seed=settings.federation.seed + server_round)
        score = mean_score(column_shape_vs_reference(sample, reference, schema))
        logger.info("round %d: column-shape score vs DP reference = %.4f", server_round, score)
        progress.update(task, advance=1, description=f"round {server_round}: shape {score:.3f}")
        return MetricRecord({"column-shape": score})

    return evaluate


def run_federation(grid: Grid, settings: RunSettings, out_dir: Path) -> dict[str, Any]:
    """All phases; returns the metrics written to `out_dir/metrics.json`."""
    fed = settings.federation
    schema = settings.load_schema()
    node_ids = wait_for_nodes(
        grid, wanted=fed.hospitals, minimum=fed.min_replies, timeout_s=fed.round_timeout_s
    )
    handshake = run_handshake(grid, node_ids, schema, fed.round_timeout_s)
    encoder = TabularEncoder.from_histograms(schema, handshake.reference)
    logger.info(
        "encoder %s built from DP histograms of %d hospital(s)",
        encoder.hash[:12],
        len(handshake.node_ids),
    )

    model_name = settings.model.generator
    params = get_model_class(model_name).Config(**settings.model.params_for(model_name))
    model = get_model_class(model_name)(encoder, params, seed=fed.seed)
    strategy = ValidatedFedAvg(
        action="generator",
        min_replies=fed.min_replies,
        min_train_nodes=fed.min_replies,
        min_available_nodes=fed.min_replies,
    )
    strategy.participants = set(handshake.node_ids)
    train_config = ConfigRecord(
        {
            "model": model_name,
            "model-params": json.dumps(params.model_dump(mode="json")),
            "encoder": encoder.to_json(),
            "encoder-hash": encoder.hash,
            "total-rounds": fed.rounds,
            "local-epochs": fed.local_epochs,
            "batch-size": fed.batch_size,
            "seed": fed.seed,
        }
    )
    with Progress(transient=False) as progress:
        task = progress.add_task("federated training", total=fed.rounds)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=fed.rounds,
            timeout=fed.round_timeout_s,
            train_config=train_config,
            evaluate_fn=_round_scorer(model, handshake.reference, settings, progress, task),
        )
    model.load_state_dict(result.arrays.to_torch_state_dict())
    synthetic = model.sample(settings.export.synthetic_rows, seed=fed.seed)
    return export_run(
        out_dir,
        model=model,
        settings=settings,
        synthetic=synthetic,
        handshake_hospitals=handshake.hospitals,
        refusals=handshake.refusals,
        rounds=strategy.rounds,
        round_scores={r: float(m["column-shape"]) for r, m in result.evaluate_metrics_serverapp.items()},
        reference=handshake.reference,
    )
