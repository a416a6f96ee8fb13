"""The phases of a federated run over Flower's Grid: handshake, training, synthesis, export."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.progress import Progress

from configs.schema import CohortSchema
from configs.settings import RunSettings
from models.bundle import sample_linked
from models.encoder import TabularEncoder
from models.registry import get_model_class
from models.statistics import Histograms, column_shape_vs_reference, mean_score, merge_histograms
from models.timegan import SequenceMoments
from server.export import HospitalSummary, export_run
from strategies.fedavg import RoundLog, ValidatedFedAvg, hospital_of

logger = logging.getLogger(__name__)


class HandshakeError(RuntimeError):
    """No hospital passed the handshake: nothing can be trained, nothing is written."""


@dataclass
class HandshakeResult:
    node_ids: list[int]
    hospitals: dict[int, HospitalSummary]
    reference: Histograms
    refusals: list[dict[str, Any]] = field(default_factory=list)
    moments: SequenceMoments | None = None  # merged DP sequence moments, when a sequence model runs


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


def _moments_of(reply: Message, schema: CohortSchema) -> SequenceMoments | str:
    """A hospital's DP sequence moments, or why they cannot be used."""
    if "moments" not in reply.content.config_records:
        return "sequence moments are missing"
    try:
        moments = SequenceMoments.from_json(str(reply.content.config_records["moments"]["json"]))
    except (ValueError, KeyError, TypeError) as err:
        return f"sequence moments are malformed: {err}"
    assert schema.sequence is not None
    shape = (schema.sequence.length, len(schema.sequence.channels))
    if moments.sums.shape != shape or moments.squares.shape != shape:
        return f"sequence moments have shape {moments.sums.shape}, expected {shape}"
    if not (np.isfinite(moments.sums).all() and np.isfinite(moments.squares).all()):
        return "sequence moments are not finite"
    return moments


def run_handshake(
    grid: Grid, node_ids: list[int], schema: CohortSchema, timeout_s: float, *, with_moments: bool = False
) -> HandshakeResult:
    """Phase 1: every node validates its data and answers counts + DP histograms (+ DP moments)."""
    config = ConfigRecord({"schema-hash": schema.schema_hash(), "with-moments": with_moments})
    content = RecordDict({"config": config})
    messages = [Message(content, dst_node_id=n, message_type="query.handshake") for n in node_ids]
    # Sorted by hospital so the merged float sums (and the encoder hash) repeat run to run.
    replies = sorted(grid.send_and_receive(messages, timeout=timeout_s), key=hospital_of)
    accepted: list[int] = []
    hospitals: dict[int, HospitalSummary] = {}
    parts: list[Histograms] = []
    moments: SequenceMoments | None = None
    refusals: list[dict[str, Any]] = []
    for reply in replies:
        node, hospital = reply.metadata.src_node_id, hospital_of(reply)
        part_moments: SequenceMoments | str | None = None
        if reply.has_error():
            problem = reply.error.reason
        else:
            problem = _histograms_problem(reply.content.array_records["histograms"], schema)
            if problem is None and with_moments:
                part_moments = _moments_of(reply, schema)
                problem = part_moments if isinstance(part_moments, str) else None
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
        if isinstance(part_moments, SequenceMoments):
            moments = part_moments if moments is None else moments.merged(part_moments)
        accepted.append(node)
    silent = sorted(set(node_ids) - {r.metadata.src_node_id for r in replies})
    for node in silent:
        refusals.append({"hospital": f"node-{node}", "node": node, "reason": "no answer before timeout"})
    if not accepted:
        reasons = "; ".join(f"{r['hospital']}: {r['reason']}" for r in refusals) or "no replies"
        raise HandshakeError(f"no hospital passed the handshake: {reasons}")
    return HandshakeResult(accepted, hospitals, merge_histograms(parts), refusals, moments)


@dataclass
class Stage:
    """A run of federated rounds for one model (and one TimeGAN phase)."""

    model: Any
    action: str  # client train action: "generator" or "sequence"
    rounds: int
    label: str
    score: Callable[[int], float]  # server-side quality after a round (DP references only)
    phase: str = ""
    rounds_before: int = 0  # rounds of this model in earlier stages
    model_rounds: int = 0  # rounds of this model over all its stages
    budget_share: float = 1.0  # share of each hospital's remaining epsilon this model may use
    extra_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageOutcome:
    rounds: list[RoundLog]
    scores: dict[int, float]


def table_scorer(model: Any, reference: Histograms, settings: RunSettings) -> Callable[[int], float]:
    """Column shapes of a synthetic sample against the DP reference histograms."""

    def score(server_round: int) -> float:
        sample = model.sample(settings.export.round_sample_rows, seed=settings.federation.seed + server_round)
        return mean_score(column_shape_vs_reference(sample, reference, model.encoder.schema))

    return score


def sequence_scorer(model: Any, profiles: np.ndarray, reference: SequenceMoments) -> Callable[[int], float]:
    """1 - mean |gap| of per-(day, channel) means and stds vs the DP sequence moments ([0, 1] scale)."""
    ref_mean, ref_std = reference.mean_std()

    def score(server_round: int) -> float:
        weeks = model.sample_encoded(profiles, seed=server_round)
        mean, std = SequenceMoments.of(weeks).mean_std()
        return float(1.0 - np.abs(mean - ref_mean).mean() - np.abs(std - ref_std).mean())

    return score


def _stage_config(stage: Stage, encoder: TabularEncoder, settings: RunSettings) -> ConfigRecord:
    fed = settings.federation
    return ConfigRecord(
        {
            "model": stage.model.registry_name,
            "model-params": json.dumps(stage.model.config.model_dump(mode="json")),
            "encoder": encoder.to_json(),
            "encoder-hash": encoder.hash,
            "phase": stage.phase,
            "model-rounds": stage.model_rounds or stage.rounds,
            "rounds-before": stage.rounds_before,
            "budget-share": stage.budget_share,
            "local-epochs": fed.local_epochs,
            "batch-size": fed.batch_size,
            "seed": fed.seed,
            **stage.extra_config,
        }
    )


def run_stage(
    grid: Grid,
    stage: Stage,
    *,
    encoder: TabularEncoder,
    settings: RunSettings,
    participants: set[int],
    progress: Progress,
    task: Any,
) -> StageOutcome:
    """Flower's strategy loop for one stage; the model ends holding the last aggregated weights."""
    fed = settings.federation
    strategy = ValidatedFedAvg(
        action=stage.action,
        min_replies=fed.min_replies,
        min_train_nodes=fed.min_replies,
        min_available_nodes=fed.min_replies,
    )
    strategy.participants = participants

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        stage.model.load_state_dict(arrays.to_torch_state_dict())
        score = stage.score(server_round)
        logger.info("%s round %d: quality score %.4f", stage.label, server_round, score)
        progress.update(task, advance=1, description=f"{stage.label} round {server_round}: {score:.3f}")
        return MetricRecord({"score": score})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(stage.model.state_dict()),
        num_rounds=stage.rounds,
        timeout=fed.round_timeout_s,
        train_config=_stage_config(stage, encoder, settings),
        evaluate_fn=evaluate,
    )
    if len(result.arrays) > 0:
        stage.model.load_state_dict(result.arrays.to_torch_state_dict())
    for log in strategy.rounds:
        log.stage = stage.label
    scores = {r: float(m["score"]) for r, m in result.evaluate_metrics_serverapp.items()}
    return StageOutcome(strategy.rounds, scores)


def build_model(name: str, encoder: TabularEncoder, settings: RunSettings) -> Any:
    model_class = get_model_class(name)
    return model_class(
        encoder, model_class.Config(**settings.model.params_for(name)), seed=settings.federation.seed
    )


def plan_stages(
    settings: RunSettings, encoder: TabularEncoder, handshake: HandshakeResult
) -> tuple[Any, Any | None, list[Stage]]:
    """The static generator first, then TimeGAN's phases; each model's share of the budget."""
    fed, seq_name = settings.federation, settings.model.sequence
    table = build_model(settings.model.generator, encoder, settings)
    table_share = 1.0 - settings.privacy.sequence_epsilon_share if seq_name else 1.0
    stages = [
        Stage(
            table,
            "generator",
            fed.rounds,
            table.registry_name,
            table_scorer(table, handshake.reference, settings),
            budget_share=table_share,
        )
    ]
    if not seq_name:
        return table, None, stages
    sequence = build_model(seq_name, encoder, settings)
    assert handshake.moments is not None
    profiles = encoder.transform(table.sample(settings.export.round_sample_rows, seed=fed.seed))
    moments = {"moments": handshake.moments.to_json()}
    done = 0
    for phase, rounds in fed.sequence_rounds.plan():
        stages.append(
            Stage(
                sequence,
                "sequence",
                rounds,
                f"{seq_name} {phase}",
                sequence_scorer(sequence, profiles, handshake.moments),
                phase=phase,
                rounds_before=done,
                model_rounds=fed.sequence_rounds.total,
                budget_share=1.0,
                extra_config=moments,
            )
        )
        done += rounds
    return table, sequence, stages


def run_federation(grid: Grid, settings: RunSettings, out_dir: Path) -> dict[str, Any]:
    """All phases; returns the metrics written to `out_dir/metrics.json`."""
    fed = settings.federation
    schema = settings.load_schema()
    node_ids = wait_for_nodes(
        grid, wanted=fed.hospitals, minimum=fed.min_replies, timeout_s=fed.round_timeout_s
    )
    handshake = run_handshake(
        grid, node_ids, schema, fed.round_timeout_s, with_moments=bool(settings.model.sequence)
    )
    encoder = TabularEncoder.from_histograms(schema, handshake.reference)
    logger.info(
        "encoder %s built from DP statistics of %d hospital(s)", encoder.hash[:12], len(handshake.node_ids)
    )

    table, sequence, stages = plan_stages(settings, encoder, handshake)
    rounds: list[RoundLog] = []
    scores: dict[str, dict[int, float]] = {}
    with Progress(transient=False) as progress:
        task = progress.add_task("federated training", total=sum(stage.rounds for stage in stages))
        for stage in stages:
            outcome = run_stage(
                grid,
                stage,
                encoder=encoder,
                settings=settings,
                participants=set(handshake.node_ids),
                progress=progress,
                task=task,
            )
            rounds.extend(outcome.rounds)
            scores[stage.label] = outcome.scores
    synthetic, timeseries = sample_linked(table, sequence, settings.export.synthetic_rows, seed=fed.seed)
    return export_run(
        out_dir,
        model=table,
        sequence_model=sequence,
        settings=settings,
        synthetic=synthetic,
        timeseries=timeseries,
        handshake_hospitals=handshake.hospitals,
        refusals=handshake.refusals,
        rounds=rounds,
        stage_scores=scores,
        reference=handshake.reference,
    )
