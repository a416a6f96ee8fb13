"""A whole federated run over Flower's Grid: handshake, the plan's stages, synthesis, export."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid
from rich.progress import Progress

from configs.settings import RunSettings
from models.base import ModelKind
from models.bundle import sample_linked
from models.encoder import TabularEncoder
from server.audit import add_risk_evaluation, gates_from, latest_ledgers
from server.checkpoint import Checkpoint, resumable_checkpoint
from server.export import QUARANTINE_DIR, TrainedRisk, export_run
from server.handshake import (
    HandshakeResult,
    count_cell_bound,
    resumed_handshake,
    run_handshake,
    wait_for_nodes,
)
from server.measure import run_measurements
from server.plan import Stage, evaluation_budget_share, plan_releases, plan_stages
from server.resume import Checkpointer
from server.risk import federated_risk, train_on_synthetic
from server.risk_evaluation import evaluate_at_hospitals
from server.rounds import StageStart, run_stage
from server.synthesis import release_and_audit

logger = logging.getLogger(__name__)


def _start_or_resume(
    grid: Grid, settings: RunSettings, out_dir: Path, node_ids: list[int], resume: bool
) -> tuple[str, HandshakeResult, TabularEncoder, Checkpoint | None]:
    """(federation id, handshake, encoder, checkpoint): a fresh handshake, or the checkpointed one."""
    schema = settings.load_schema()
    if not resume:
        federation_id = secrets.token_hex(8)
        handshake = run_handshake(
            grid,
            node_ids,
            schema,
            settings.federation.round_timeout_s,
            releases=plan_releases(settings),
            max_hospital_weight=settings.federation.max_hospital_weight,
            federation_id=federation_id,
        )
        return federation_id, handshake, TabularEncoder.from_histograms(schema, handshake.reference), None
    checkpoint = resumable_checkpoint(out_dir, settings)
    saved = checkpoint.progress
    logger.info(
        "resuming federation %s after %s round %d", saved.federation_id, saved.stage_label, saved.rounds_done
    )
    handshake = resumed_handshake(grid, node_ids, checkpoint, settings)
    return saved.federation_id, handshake, TabularEncoder.from_json(saved.encoder_json, schema), checkpoint


def _run_stages(
    grid: Grid,
    stages: list[Stage],
    checkpointer: Checkpointer,
    checkpoint: Checkpoint | None,
    *,
    settings: RunSettings,
    encoder: TabularEncoder,
    handshake: HandshakeResult,
    federation_id: str,
) -> list[dict[str, Any]]:
    """Every stage from where the run stands: a statistics generator's measurements and fit, then the
    rounds, each checkpointed; returns the hospitals' measurement refusals."""
    first_stage, start = checkpointer.restore(checkpoint) if checkpoint else (0, StageStart())
    refusals: list[dict[str, Any]] = []
    if checkpoint is None:  # a resumed run loads a statistics generator's fit from the checkpoint
        for stage in stages:
            if stage.model.kind == ModelKind.STATISTICS_GENERATOR:
                refusals += run_measurements(
                    grid,
                    stage,
                    handshake,
                    timeout_s=settings.federation.round_timeout_s,
                    federation_id=federation_id,
                    cell_bound=count_cell_bound(settings.federation.max_hospital_weight),
                )
    remaining = sum(s.rounds for s in stages[first_stage:]) - (start.first_round - 1)
    with Progress(transient=False) as progress:
        task = progress.add_task("federated training", total=remaining)
        for stage in stages[first_stage:]:
            if stage.rounds == 0:
                continue
            outcome = run_stage(
                grid,
                stage,
                encoder=encoder,
                settings=settings,
                participants=set(handshake.node_ids),
                progress=progress,
                task=task,
                federation_id=federation_id,
                start=start,
                after_round=checkpointer.after_round,
                hospital_names={node: h.hospital for node, h in handshake.hospitals.items()},
                weights={h.hospital: h.num_examples for h in handshake.hospitals.values()},
            )
            checkpointer.stage_finished(stage, outcome)
            start = StageStart()
    return refusals


def _release_folder(passed: bool, settings: RunSettings) -> str:
    """Where the release is written: in place after a PASS, under quarantine/ after a FAIL unless
    the operator set `audit.release_on_fail`."""
    if passed:
        return ""
    if settings.audit.release_on_fail:
        logger.warning("the audit FAILED; the release is written anyway (audit.release_on_fail)")
        return ""
    logger.warning("the audit FAILED: the release is written under %s/ only", QUARANTINE_DIR)
    return QUARANTINE_DIR


def _evaluate_risk(
    grid: Grid,
    settings: RunSettings,
    risk: list[TrainedRisk],
    encoder: TabularEncoder,
    handshake: HandshakeResult,
    audit: dict[str, Any],
    out_dir: Path,
    synthetic: Any,
    federation_id: str,
) -> dict[str, Any]:
    """The hospitals' DP evaluation of every risk model; the report and `audit["ledger"]` gain it."""
    evaluation = evaluate_at_hospitals(
        grid,
        sorted(handshake.node_ids),
        risk,
        encoder,
        budget_share=evaluation_budget_share(settings),
        federation_id=federation_id,
        timeout_s=settings.federation.round_timeout_s,
    )
    if evaluation:  # each hospital's latest charges: the evaluation's ledger where it answered
        audit["ledger"] = latest_ledgers(audit["ledger"], evaluation["ledger"])
        add_risk_evaluation(out_dir, evaluation, synthetic, encoder.schema, gates_from(settings.audit))
    return evaluation


def run_federation(
    grid: Grid, settings: RunSettings, out_dir: Path, *, resume: bool = False
) -> dict[str, Any]:
    """All phases; returns the metrics written to `out_dir/metrics.json`.

    With `resume`, the run goes on from `out_dir/checkpoint` at the round after the last
    completed one, with the same federation id, encoder and DP statistics; a checkpoint made
    with other settings (operational knobs aside) is refused, listing what differs.
    """
    fed = settings.federation
    node_ids = wait_for_nodes(
        grid, wanted=fed.hospitals, minimum=fed.min_replies, timeout_s=fed.join_timeout_s
    )
    federation_id, handshake, encoder, checkpoint = _start_or_resume(
        grid, settings, out_dir, node_ids, resume
    )
    logger.info(
        "encoder %s built from DP statistics of %d hospital(s)", encoder.hash[:12], len(handshake.node_ids)
    )
    planned = plan_stages(settings, encoder, handshake)
    stages = planned.stages
    checkpointer = Checkpointer(
        out_dir,
        federation_id=federation_id,
        settings=settings,
        encoder=encoder,
        handshake=handshake,
        stages=stages,
    )
    measurement_refusals = _run_stages(
        grid,
        stages,
        checkpointer,
        checkpoint,
        settings=settings,
        encoder=encoder,
        handshake=handshake,
        federation_id=federation_id,
    )
    synthetic, timeseries = sample_linked(
        planned.table, planned.sequence, settings.export.synthetic_rows, seed=fed.seed
    )
    controller = stages[0].controller
    synthetic, timeseries, audit = release_and_audit(
        grid,
        settings,
        handshake,
        planned.table,
        controller,
        synthetic,
        timeseries,
        out_dir,
        federation_id=federation_id,
    )
    risk = federated_risk(planned.risk_models) + train_on_synthetic(settings, encoder, synthetic, timeseries)
    evaluation = _evaluate_risk(
        grid, settings, risk, encoder, handshake, audit, out_dir, synthetic, federation_id
    )
    return export_run(
        out_dir,
        release_folder=_release_folder(bool(audit["audit"]["passed"]), settings),
        model=planned.table,
        sequence_model=planned.sequence,
        risk_models=risk,
        settings=settings,
        synthetic=synthetic,
        timeseries=timeseries,
        handshake_hospitals=handshake.hospitals,
        refusals=handshake.refusals,
        rounds=checkpointer.rounds,
        stage_scores=checkpointer.scores,
        reference=handshake.reference,
        extra_metrics={
            **audit,
            "federation_id": federation_id,
            "resumed": resume,
            "measurement_refusals": measurement_refusals,
            "risk_evaluation": evaluation,
        },
    )
