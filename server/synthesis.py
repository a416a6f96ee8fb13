"""The released synthetic set: SA-DQC's filter, the hospitals' DP audit of the generator, the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from flwr.serverapp import Grid

from configs.settings import RunSettings
from privacy.dp_audit import AUDIT_CHARGE
from server.audit import (
    audit_request,
    audit_rows,
    gates_from,
    render_report,
    request_audit,
    save_audit_inputs,
)
from server.handshake import HandshakeResult
from server.plan import audit_budget_share
from server.sadqc import SADQC, filter_anomalies, score_sample

logger = logging.getLogger(__name__)


def release_and_audit(
    grid: Grid,
    settings: RunSettings,
    handshake: HandshakeResult,
    model: Any,
    controller: SADQC | None,
    synthetic: pd.DataFrame,
    timeseries: pd.DataFrame | None,
    out_dir: Path,
    *,
    federation_id: str = "",
) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, Any]]:
    """SA-DQC filters the final set, hospitals audit the generator, the report is written; returns
    what is released and the audit's record (verdict, gates, its epsilon, SA-DQC's decisions)."""
    encoder, fed = model.encoder, settings.federation
    schema = encoder.schema
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
    content = audit_request(
        model, settings, budget_share=audit_budget_share(settings), federation_id=federation_id
    )
    answers = request_audit(grid, sorted(handshake.node_ids), content, fed.round_timeout_s)
    dcr, attacks = audit_rows(answers, n_bootstrap=settings.audit.bootstrap, seed=fed.seed)
    inputs = {
        "quality": {**final_scores.model_dump(), "removed": removed},
        "reference_histograms": handshake.reference,
        "reference_pairs": handshake.reference_pairs,
        "dcr": dcr,
        "attacks": attacks,
        "ledger": answers.ledgers,
        "decisions": controller.decisions() if controller is not None else [],
        "audit_refusals": answers.refusals,
    }
    save_audit_inputs(out_dir, inputs)
    report = render_report(out_dir, inputs, synthetic, schema, gates_from(settings.audit))
    logger.info("privacy audit: %s (report %s)", "PASS" if report.passed else "FAIL", report.html_path)
    audit = {
        "ledger": answers.ledgers,
        "audit": {
            "passed": report.passed,
            "gates": [g.model_dump() for g in report.gates],
            "refusals": answers.refusals,
            "epsilon": _audit_epsilon(answers.ledgers),
        },
        "sadqc": {"final": final_scores.model_dump(), "removed": removed, "decisions": inputs["decisions"]},
    }
    return synthetic, timeseries, audit


def _audit_epsilon(ledgers: list[dict[str, Any]]) -> dict[str, float]:
    """Per hospital, what the audit's release added to its epsilon (from the charges it reported)."""
    out = {}
    for ledger in ledgers:
        entries = ledger.get("entries") or []
        for index, entry in enumerate(entries):
            if entry.get("what") == AUDIT_CHARGE:
                before = entries[index - 1]["epsilon_after"] if index > 0 else 0.0
                out[ledger["hospital"]] = float(entry["epsilon_after"]) - float(before)
    return out
