"""Audit report: `report.json` and a self-contained `report.html` (plots embedded as PNG data URIs).

Sections: pass/fail gates, quality (synthetic vs DP reference marginals, association-difference
heatmap, SA-DQC scores), privacy (DCR histograms and ROC curves of each membership attack, with
per-hospital tables), the per-hospital epsilon ledger, and the SA-DQC decision timeline.

Everything shown is already aggregate: DP statistics, synthetic rows, and the metrics and counts
hospitals sent back. Text from inputs is HTML-escaped; the page loads nothing from anywhere.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from configs.schema import CohortSchema, ColumnSpec
from models.statistics import Histograms, column_counts
from privacy.storage import atomic_write_text
from server.report_gates import GateResult, GateThresholds, evaluate_gates
from server.report_html import render_html

__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "REPORT_VERSION",
    "GateResult",
    "GateThresholds",
    "ReportResult",
    "evaluate_gates",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_VERSION = 1


@dataclass(frozen=True)
class ReportResult:
    """Where the report was written, its overall verdict and each gate's result."""

    json_path: Path
    html_path: Path
    passed: bool
    gates: list[GateResult]


# ---------------------------------------------------------------------------- JSON
def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, BaseModel):
        return item.model_dump(mode="json")
    if is_dataclass(item) and not isinstance(item, type):
        return asdict(item)
    return dict(item)


def _jsonable(value: Any) -> Any:
    """Plain JSON values; NaN and infinities become null (the JSON is written strict)."""
    if isinstance(value, BaseModel):
        return _jsonable(value.model_dump(mode="json"))
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _probabilities(counts: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    total = c.sum()
    return c / total if total > 0 else np.zeros_like(c)


def _cell_labels(spec: ColumnSpec) -> list[str]:
    if spec.is_categorical:
        return list(spec.categories or ())
    edges = spec.bin_edges()
    return [f"[{lo:g}, {hi:g})" for lo, hi in itertools.pairwise(edges)]


def _marginals(
    schema: CohortSchema, reference: Histograms, synthetic: pd.DataFrame
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for spec in schema.columns:
        ref = np.asarray(reference.get(spec.name, np.zeros(spec.n_cells())), dtype=np.float64)
        out[spec.name] = {
            "kind": spec.kind,
            "cells": _cell_labels(spec),
            "reference": _probabilities(ref).tolist(),
            "synthetic": _probabilities(column_counts(synthetic[spec.name], spec)).tolist(),
        }
    return out


# ---------------------------------------------------------------------------- report
def _hospital_sorted(items: Sequence[Any]) -> list[dict[str, Any]]:
    rows = [_as_dict(item) for item in items]
    for i, row in enumerate(rows):
        row.setdefault("hospital", f"hospital-{i + 1}")
    return sorted(rows, key=lambda r: (str(r["hospital"]), str(r.get("name", ""))))


def write_report(
    out_dir: Path,
    *,
    quality: Mapping[str, Any],
    per_column_reference: Histograms,
    synthetic: pd.DataFrame,
    schema: CohortSchema,
    pair_differences: Mapping[str, float],
    dcr: Sequence[Any],
    attacks: Sequence[Any],
    ledger: Sequence[Any],
    decisions: Sequence[Any],
    gates: GateThresholds | None = None,
    risk_evaluation: Mapping[str, Any] | None = None,
) -> ReportResult:
    """Write `report.json` and `report.html` into `out_dir` (each atomically); return the verdict.

    quality: e.g. `QualityScores.model_dump()` of the released set plus any extra scalars (filter
    counts); its `per_column` scores label the marginal plots. pair_differences: `"a|b"` ->
    synthetic minus reference association (`models.pairs.association_differences`). dcr / attacks:
    one dict per hospital (and attack) with DCRResult / AttackResult fields plus `hospital`.
    ledger: one dict per hospital (scalars, optional `entries` list of charges). decisions:
    `SADQC.decisions()`. Gates are evaluated on the pooled rows and per hospital (`evaluate_gates`).
    risk_evaluation: the hospitals' DP evaluation of the risk models (`server.risk_evaluation`), once
    it has run; it informs and does not gate.
    """
    gates = gates or GateThresholds()
    out_dir = Path(out_dir)
    dcr_rows = _hospital_sorted(dcr)
    attack_rows = _hospital_sorted(attacks)
    ledger_rows = _hospital_sorted(ledger)
    decision_rows = [_as_dict(d) for d in decisions]
    gate_results = evaluate_gates(dcr_rows, attack_rows, gates)
    passed = all(g.passed for g in gate_results)
    doc = _jsonable(
        {
            "version": REPORT_VERSION,
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "passed": passed,
            "gates": {
                "thresholds": gates.model_dump(),
                "evaluated_on": "every hospital pooled (worst attack); per hospital: CI lower bound",
                "results": [g.model_dump() for g in gate_results],
            },
            "quality": {
                "scores": _as_dict(quality),
                "synthetic_rows": len(synthetic),
                "marginals": _marginals(schema, per_column_reference, synthetic),
                "pair_differences": dict(pair_differences),
            },
            "privacy": {"dcr": dcr_rows, "attacks": attack_rows},
            "ledger": ledger_rows,
            "sadqc": {"decisions": decision_rows},
            "risk_models": dict(risk_evaluation or {}),
        }
    )
    html_text = render_html(doc, schema, gate_results, passed)
    json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    atomic_write_text(json_path, json.dumps(doc, indent=2, allow_nan=False))
    atomic_write_text(html_path, html_text)
    logger.info(
        "audit report written to %s: %s (%s)",
        out_dir,
        "PASS" if passed else "FAIL",
        "; ".join(f"{g.name} {'ok' if g.passed else 'FAILED'}" for g in gate_results),
    )
    return ReportResult(json_path=json_path, html_path=html_path, passed=passed, gates=gate_results)
