"""Phase 4: the federated privacy audit and the report, from synthetic data and aggregates only."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs import wire
from configs.schema import CohortSchema
from configs.settings import AuditSettings
from configs.wire import FEDERATION_ID
from models.encoder import TabularEncoder
from models.pairs import association_differences
from models.statistics import Histograms
from privacy.attacks import FPR_GRID
from privacy.storage import atomic_write_text
from server.report import GateThresholds, ReportResult, write_report
from strategies.rounds import hospital_of

logger = logging.getLogger(__name__)

AUDIT_INPUTS_FILE = "audit_inputs.json"


@dataclass
class AuditAnswers:
    dcr: list[dict[str, Any]] = field(default_factory=list)
    attacks: list[dict[str, Any]] = field(default_factory=list)
    ledgers: list[dict[str, Any]] = field(default_factory=list)
    sequence: list[dict[str, Any]] = field(default_factory=list)  # per hospital, with "n" weeks
    refusals: list[dict[str, Any]] = field(default_factory=list)


def request_audit(
    grid: Grid,
    node_ids: list[int],
    sample: np.ndarray,
    encoder: TabularEncoder,
    timeout_s: float,
    weeks: np.ndarray | None = None,
    *,
    federation_id: str = "",
) -> AuditAnswers:
    """Send the encoded synthetic sample (and its weeks); collect every hospital's aggregates."""
    config = ConfigRecord(
        {"encoder": encoder.to_json(), "encoder-hash": encoder.hash, FEDERATION_ID: federation_id}
    )
    arrays = {"encoded": Array(sample)} | ({"weeks": Array(weeks)} if weeks is not None else {})
    content = RecordDict({wire.CONFIG: config, wire.SYNTHETIC: ArrayRecord(arrays)})
    messages = [Message(content, dst_node_id=n, message_type=wire.AUDIT) for n in node_ids]
    replies = sorted(grid.send_and_receive(messages, timeout=timeout_s), key=hospital_of)
    out = AuditAnswers()
    for reply in replies:
        hospital = hospital_of(reply)
        if reply.has_error():
            out.refusals.append({"hospital": hospital, "reason": reply.error.reason})
            continue
        answers = dict(reply.content.metric_records[wire.AUDIT_ANSWERS])
        out.dcr.append({"hospital": hospital, **_prefixed(answers, "dcr/")})
        names = sorted({key.split("/")[1] for key in answers if key.startswith("attack/")})
        out.attacks.extend(
            {"hospital": hospital, "name": name, **_prefixed(answers, f"attack/{name}/")} for name in names
        )
        if any(key.startswith("sequence/") for key in answers):
            out.sequence.append({"hospital": hospital, **_prefixed(answers, "sequence/")})
        entries = json.loads(str(reply.content.config_records[wire.LEDGER]["json"]))
        out.ledgers.append(
            {
                "hospital": hospital,
                "epsilon": entries[-1]["epsilon_after"] if entries else 0.0,
                "charges": len(entries),
                "entries": entries,
            }
        )
    return out


def merge_sequence_metrics(per_hospital: list[dict[str, Any]]) -> dict[str, float]:
    """Hospitals' sequence metrics weighted by their real weeks; counts are summed."""
    if not per_hospital:
        return {}
    weights = np.array([float(h.get("n-real", 1.0)) for h in per_hospital])
    keys = [k for k in per_hospital[0] if k != "hospital"]
    merged = {}
    for key in keys:
        values = np.array([float(h[key]) for h in per_hospital])
        merged[key] = float(
            values.sum()
            if key.startswith("n-") or key.endswith("-n-test")
            else (weights * values).sum() / weights.sum()
        )
    return merged


def _prefixed(answers: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {key.removeprefix(prefix): value for key, value in answers.items() if key.startswith(prefix)}


def check_aggregate_only(rows: list[dict[str, Any]]) -> None:
    """Refuse an answer that could carry per-record values: lists must have public fixed lengths."""
    fixed = {len(FPR_GRID)}
    for row in rows:
        for key, value in row.items():
            if (
                isinstance(value, list)
                and len(value) not in fixed
                and not key.endswith(("_edges", "_counts"))
            ):
                raise ValueError(f"audit answer {key!r} from {row.get('hospital')} is not an aggregate")


def gates_from(settings: AuditSettings) -> GateThresholds:
    """The `[audit]` table's gate thresholds (the other keys there drive the audit itself)."""
    return GateThresholds(**settings.model_dump(include=set(GateThresholds.model_fields)))


def save_audit_inputs(out_dir: Path, inputs: dict[str, Any]) -> None:
    """What `mindfed audit --run DIR` needs to write the report again (all aggregates)."""
    atomic_write_text(Path(out_dir) / AUDIT_INPUTS_FILE, json.dumps(inputs, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def render_report(
    out_dir: Path,
    inputs: dict[str, Any],
    synthetic: pd.DataFrame,
    schema: CohortSchema,
    gates: GateThresholds,
) -> ReportResult:
    """report.html + report.json from saved aggregates and the released synthetic table."""
    reference: Histograms = {k: np.asarray(v, dtype=float) for k, v in inputs["reference_histograms"].items()}
    reference_pairs = {k: np.asarray(v, dtype=float) for k, v in inputs["reference_pairs"].items()}
    return write_report(
        out_dir,
        quality=inputs["quality"],
        per_column_reference=reference,
        synthetic=synthetic,
        schema=schema,
        pair_differences=association_differences(synthetic, reference_pairs, schema),
        dcr=inputs["dcr"],
        attacks=inputs["attacks"],
        ledger=inputs["ledger"],
        decisions=inputs["decisions"],
        gates=gates,
    )


def rerender_run_report(run_dir: Path, gate_overrides: dict[str, float]) -> ReportResult:
    """`mindfed audit --run DIR`: the report again from the run's saved aggregates and release."""
    from configs.settings import settings_from_dict  # the run's own settings, as it recorded them

    run_dir = Path(run_dir)
    for needed in (AUDIT_INPUTS_FILE, "metrics.json", "synthetic/static.csv"):
        if not (run_dir / needed).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished MindFed run: {needed} is missing")
    inputs = json.loads((run_dir / AUDIT_INPUTS_FILE).read_text(encoding="utf-8"))
    recorded = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["settings"]
    settings = settings_from_dict(recorded, source=str(run_dir / "metrics.json"), base_dir=run_dir)
    synthetic = pd.read_csv(run_dir / "synthetic" / "static.csv")
    gates = gates_from(settings.audit).model_copy(update=gate_overrides)
    return render_report(run_dir, inputs, synthetic, settings.load_schema(), gates)
