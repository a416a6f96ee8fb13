"""Phase 4: the federated privacy audit (DP attack histograms from every hospital) and the report."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs import wire
from configs.schema import CohortSchema
from configs.settings import AuditSettings, RunSettings
from configs.wire import AuditRequest, finite_metric
from models.pairs import association_differences
from models.statistics import Histograms
from privacy.dp_audit import AUDIT_ATTACKS, EDGES_SUFFIX, attack_figures, dcr_protection
from privacy.storage import atomic_write_text
from server.report import GateThresholds, ReportResult, write_report
from server.report_gates import POOLED
from strategies.rounds import hospital_of

logger = logging.getLogger(__name__)

AUDIT_INPUTS_FILE = "audit_inputs.json"


@dataclass
class AuditAnswers:
    """Each hospital's noisy attack histograms ((2, bins) per attack) and noise sd, and its ledger."""

    counts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    edges: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    noise_sd: dict[str, float] = field(default_factory=dict)
    ledgers: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)


def audit_request(
    model: Any, settings: RunSettings, *, budget_share: float, federation_id: str
) -> RecordDict:
    """The audit message: the static generator's sampler state and a typed request, never rows."""
    request = AuditRequest(
        model=model.registry_name,
        model_params=model.config.model_dump(mode="json"),
        encoder_json=model.encoder.to_json(),
        encoder_hash=model.encoder.hash,
        rows=settings.audit.synthetic_rows,
        budget_share=budget_share,
        sample_seed=settings.federation.seed,
        federation_id=federation_id,
    )
    state = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in model.sampler_state_dict().items()})
    return RecordDict({wire.CONFIG: request.to_config(), wire.MODEL: state})


def _reply_counts(reply: Message) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """A hospital's noisy histograms and their edges, refused (ValueError) unless every attack's
    counts are a finite (2, k) array over k - 1 increasing edges."""
    if (
        wire.AUDIT_COUNTS not in reply.content.array_records
        or wire.METRICS not in reply.content.metric_records
    ):
        raise ValueError(f"the reply lacks '{wire.AUDIT_COUNTS}' or '{wire.METRICS}'")
    record = reply.content.array_records[wire.AUDIT_COUNTS]
    counts, edges = {}, {}
    for name in AUDIT_ATTACKS:
        if name not in record:
            raise ValueError(f"attack '{name}' is missing")
        array = np.asarray(record[name].numpy(), dtype=np.float64)
        if array.ndim != 2 or array.shape[0] != 2 or array.shape[1] < 2 or not np.isfinite(array).all():
            raise ValueError(f"attack '{name}' counts have shape {array.shape} or are not finite")
        counts[name] = array
        edges[name] = np.asarray(record[name + EDGES_SUFFIX].numpy(), dtype=np.float64)
        if edges[name].shape != (array.shape[1] - 1,) or np.any(np.diff(edges[name]) <= 0):
            raise ValueError(f"attack '{name}' edges do not fit its {array.shape[1]} bins")
    noise_sd = finite_metric(reply.content.metric_records[wire.METRICS], "noise-sd")
    if noise_sd < 0:
        raise ValueError(f"noise-sd {noise_sd!r} is negative")
    return counts, edges, noise_sd


def ledger_row(reply: Message, hospital: str) -> dict[str, Any]:
    """A one-off release's reply as a ledger row: the hospital's charges and its epsilon after them."""
    entries = json.loads(str(reply.content.config_records[wire.LEDGER]["json"]))
    return {
        "hospital": hospital,
        "epsilon": entries[-1]["epsilon_after"] if entries else 0.0,
        "charges": len(entries),
        "entries": entries,
    }


def latest_ledgers(earlier: list[dict[str, Any]], later: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per hospital, its ledger row from `later` where there is one, else from `earlier`."""
    rows = {row["hospital"]: row for row in earlier} | {row["hospital"]: row for row in later}
    return [rows[h] for h in sorted(rows)]


def request_audit(grid: Grid, node_ids: list[int], content: RecordDict, timeout_s: float) -> AuditAnswers:
    """Ask every hospital for its audit release; a malformed answer is that hospital's refusal."""
    messages = [Message(content, dst_node_id=n, message_type=wire.AUDIT) for n in node_ids]
    replies = sorted(grid.send_and_receive(messages, timeout=timeout_s), key=hospital_of)
    out = AuditAnswers()
    for reply in replies:
        hospital = hospital_of(reply)
        if reply.has_error():
            out.refusals.append({"hospital": hospital, "reason": reply.error.reason})
            continue
        try:
            out.counts[hospital], out.edges[hospital], out.noise_sd[hospital] = _reply_counts(reply)
            out.ledgers.append(ledger_row(reply, hospital))
        except (KeyError, TypeError, ValueError) as err:
            out.counts.pop(hospital, None)
            out.refusals.append({"hospital": hospital, "reason": f"malformed audit reply: {err}"[:300]})
    return out


def _pooled_parts(answers: AuditAnswers, name: str) -> list[tuple[np.ndarray, float]]:
    """One attack's histograms of every hospital as one part (counts added, noise in quadrature)
    when they share bins, as they do when every node drew the same sample; else one per hospital."""
    hospitals = sorted(answers.counts)
    parts = [(answers.counts[h][name], answers.noise_sd[h]) for h in hospitals]
    first = answers.edges[hospitals[0]][name]
    if all(np.array_equal(answers.edges[h][name], first) for h in hospitals):
        return [(sum(c for c, _ in parts), float(np.sqrt(sum(sd**2 for _, sd in parts))))]
    logger.warning("audit: the hospitals' %s bins differ; pooled by vertical averaging", name)
    return parts


def audit_rows(
    answers: AuditAnswers, *, n_bootstrap: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """DCR and attack rows per hospital and pooled (`POOLED`), all from the noisy histograms."""
    dcr_rows, attack_rows = [], []
    for where in [*sorted(answers.counts), *([POOLED] if answers.counts else [])]:
        for name in AUDIT_ATTACKS:
            if where == POOLED:
                parts = _pooled_parts(answers, name)
            else:
                parts = [(answers.counts[where][name], answers.noise_sd[where])]
            figures = attack_figures(parts, n_bootstrap=n_bootstrap, seed=seed)
            attack_rows.append({"hospital": where, "name": name, **asdict(figures)})
            if name == "distance":
                dcr_rows.append({"hospital": where, **dcr_protection(figures, parts)})
    return dcr_rows, attack_rows


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
        risk_evaluation=inputs.get("risk_evaluation"),
    )


def add_risk_evaluation(
    out_dir: Path,
    evaluation: dict[str, Any],
    synthetic: pd.DataFrame,
    schema: CohortSchema,
    gates: GateThresholds,
) -> ReportResult:
    """The report again with the hospitals' DP evaluation of the risk models (which comes after the
    audit); the saved aggregates gain it, so `mindfed audit --run` redraws the same page."""
    inputs = json.loads((Path(out_dir) / AUDIT_INPUTS_FILE).read_text(encoding="utf-8"))
    inputs["risk_evaluation"] = evaluation
    inputs["ledger"] = latest_ledgers(inputs["ledger"], evaluation.get("ledger", []))
    save_audit_inputs(out_dir, inputs)
    return render_report(out_dir, inputs, synthetic, schema, gates)


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
