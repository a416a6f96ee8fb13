"""The released synthetic set: SA-DQC's filter, the hospitals' audit, the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from flwr.serverapp import Grid

from configs.settings import RunSettings
from models.encoder import TabularEncoder
from models.sequence.encoder import SequenceEncoder
from server.audit import (
    check_aggregate_only,
    gates_from,
    merge_sequence_metrics,
    render_report,
    request_audit,
    save_audit_inputs,
)
from server.handshake import HandshakeResult
from server.sadqc import SADQC, filter_anomalies, score_sample

logger = logging.getLogger(__name__)


def release_and_audit(
    grid: Grid,
    settings: RunSettings,
    handshake: HandshakeResult,
    encoder: TabularEncoder,
    controller: SADQC | None,
    synthetic: pd.DataFrame,
    timeseries: pd.DataFrame | None,
    out_dir: Path,
    *,
    federation_id: str = "",
) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, Any]]:
    """SA-DQC filters the final set, hospitals audit it, the report is written; returns what is released."""
    schema, fed = encoder.schema, settings.federation
    kept, removed = filter_anomalies(
        synthetic,
        encoder.transform(synthetic),
        schema=schema,
        contamination=settings.sadqc.contamination,
        seed=fed.seed,
    )
    synthetic = synthetic.loc[kept.index].reset_index(drop=True)
    if timeseries is not None:  # a removed profile takes its week with it
        timeseries = timeseries[timeseries[schema.id_column].isin(set(synthetic[schema.id_column]))]
        timeseries = timeseries.reset_index(drop=True)
    final_scores = score_sample(synthetic, handshake.reference, handshake.reference_pairs, schema)
    if controller is not None:
        controller.record_filter(
            settings.stages[0].rounds,
            n_before=len(kept) + sum(removed.values()),
            removed=removed,
            scores=final_scores,
        )
    audited = synthetic.head(settings.audit.synthetic_rows)
    sample = encoder.transform(audited)
    weeks = None
    if timeseries is not None:
        weeks = SequenceEncoder.from_schema(schema).transform(
            timeseries[timeseries[schema.id_column].isin(set(audited[schema.id_column]))],
            audited[schema.id_column],
        )
    answers = request_audit(
        grid,
        sorted(handshake.node_ids),
        sample,
        encoder,
        fed.round_timeout_s,
        weeks,
        federation_id=federation_id,
    )
    dcr, attacks, ledgers, refusals = answers.dcr, answers.attacks, answers.ledgers, answers.refusals
    check_aggregate_only(dcr + attacks)
    inputs = {
        "quality": {**final_scores.model_dump(), "removed": removed},
        "reference_histograms": handshake.reference,
        "reference_pairs": handshake.reference_pairs,
        "dcr": dcr,
        "attacks": attacks,
        "ledger": ledgers,
        "decisions": controller.decisions() if controller is not None else [],
        "audit_refusals": refusals,
    }
    save_audit_inputs(out_dir, inputs)
    report = render_report(out_dir, inputs, synthetic, schema, gates_from(settings.audit))
    logger.info("privacy audit: %s (report %s)", "PASS" if report.passed else "FAIL", report.html_path)
    audit = {
        "ledger": ledgers,
        "audit": {
            "passed": report.passed,
            "gates": [g.model_dump() for g in report.gates],
            "refusals": refusals,
        },
        "sadqc": {"final": final_scores.model_dump(), "removed": removed, "decisions": inputs["decisions"]},
        "sequence_evaluation": {
            "merged": merge_sequence_metrics(answers.sequence),
            "per_hospital": answers.sequence,
        },
    }
    return synthetic, timeseries, audit
