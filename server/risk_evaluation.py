"""The risk models judged where the real patients are: every hospital scores each route's model on
its held-out patients and releases noisy count tables once; the server merges them into figures."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from configs import wire
from configs.wire import EvaluateRequest, finite_metric
from models.encoder import TabularEncoder
from models.risk.dp_scores import CONFUSION, FLAGGED, SCORE_EDGES, table_figures
from server.audit import ledger_row
from server.export import TrainedRisk
from server.report_gates import POOLED
from strategies.rounds import hospital_of

logger = logging.getLogger(__name__)


@dataclass
class EvaluationAnswers:
    """Each hospital's noisy tables (folder -> table -> counts), noise sd and ledger; refusals."""

    tables: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    noise_sd: dict[str, float] = field(default_factory=dict)
    ledgers: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)


def evaluation_request(
    risk: list[TrainedRisk], encoder: TabularEncoder, *, budget_share: float, federation_id: str
) -> RecordDict:
    """The evaluation message: each model's name, parameters and state (never rows)."""
    request = EvaluateRequest(
        models={r.folder: (r.model.registry_name, r.model.config.model_dump(mode="json")) for r in risk},
        encoder_json=encoder.to_json(),
        encoder_hash=encoder.hash,
        budget_share=budget_share,
        federation_id=federation_id,
    )
    content = RecordDict({wire.CONFIG: request.to_config()})
    for r in risk:
        state = {k: Array(v.detach().cpu().numpy()) for k, v in r.model.state_dict().items()}
        content[wire.RISK_MODEL_PREFIX + r.folder] = ArrayRecord(state)
    return content


def _reply_tables(
    reply: Message, folders: list[str], n_classes: int
) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """A hospital's tables per model, refused (ValueError) unless each is finite and of its shape."""
    if (
        wire.RISK_COUNTS not in reply.content.array_records
        or wire.METRICS not in reply.content.metric_records
    ):
        raise ValueError(f"the reply lacks '{wire.RISK_COUNTS}' or '{wire.METRICS}'")
    record = reply.content.array_records[wire.RISK_COUNTS]
    shapes = {CONFUSION: (n_classes, n_classes), FLAGGED: (2, len(SCORE_EDGES) + 1)}
    tables: dict[str, dict[str, np.ndarray]] = {}
    for folder in folders:
        tables[folder] = {}
        for table, shape in shapes.items():
            key = f"{folder}.{table}"
            if key not in record:
                raise ValueError(f"table '{key}' is missing")
            array = np.asarray(record[key].numpy(), dtype=np.float64)
            if array.shape != shape or not np.isfinite(array).all():
                raise ValueError(f"table '{key}' has shape {array.shape} (wanted {shape}) or is not finite")
            tables[folder][table] = array
    noise_sd = finite_metric(reply.content.metric_records[wire.METRICS], "noise-sd")
    if noise_sd < 0:
        raise ValueError(f"noise-sd {noise_sd!r} is negative")
    return tables, noise_sd


def request_evaluation(
    grid: Grid, node_ids: list[int], content: RecordDict, folders: list[str], n_classes: int, timeout_s: float
) -> EvaluationAnswers:
    """Ask every hospital for its evaluation release; a malformed answer is that hospital's refusal."""
    messages = [Message(content, dst_node_id=n, message_type=wire.EVALUATE) for n in node_ids]
    out = EvaluationAnswers()
    for reply in sorted(grid.send_and_receive(messages, timeout=timeout_s), key=hospital_of):
        hospital = hospital_of(reply)
        if reply.has_error():
            out.refusals.append({"hospital": hospital, "reason": reply.error.reason})
            continue
        try:
            out.tables[hospital], out.noise_sd[hospital] = _reply_tables(reply, folders, n_classes)
            out.ledgers.append(ledger_row(reply, hospital))
        except (KeyError, TypeError, ValueError) as err:
            out.tables.pop(hospital, None)
            out.refusals.append({"hospital": hospital, "reason": f"malformed evaluation reply: {err}"[:300]})
    return out


def evaluation_rows(answers: EvaluationAnswers, risk: list[TrainedRisk]) -> list[dict[str, Any]]:
    """Per model and route, its figures at each hospital and pooled (`POOLED`: tables summed, noise
    sd in quadrature), all from the noisy tables."""
    rows = []
    hospitals = sorted(answers.tables)
    for r in risk:
        parts = {h: answers.tables[h][r.folder] for h in hospitals}
        sds = {h: answers.noise_sd[h] for h in hospitals}
        if hospitals:
            parts[POOLED] = {t: sum(parts[h][t] for h in hospitals) for t in (CONFUSION, FLAGGED)}
            sds[POOLED] = float(np.sqrt(sum(sd**2 for sd in sds.values())))
        for where, tables in parts.items():
            rows.append(
                {
                    "model": r.model.registry_name,
                    "route": r.route,
                    "hospital": where,
                    **table_figures(tables, sds[where]),
                }
            )
    return rows


def evaluate_at_hospitals(
    grid: Grid,
    node_ids: list[int],
    risk: list[TrainedRisk],
    encoder: TabularEncoder,
    *,
    budget_share: float,
    federation_id: str,
    timeout_s: float,
) -> dict[str, Any]:
    """The whole evaluation: request, replies, rows; {} when there is no risk model or no share."""
    if not risk or budget_share <= 0:
        return {}
    label = encoder.schema.column(encoder.schema.label_column)
    content = evaluation_request(risk, encoder, budget_share=budget_share, federation_id=federation_id)
    folders = [r.folder for r in risk]
    answers = request_evaluation(grid, node_ids, content, folders, len(label.categories or ()), timeout_s)
    rows = evaluation_rows(answers, risk)
    for row in rows:
        if row["hospital"] == POOLED:
            logger.info(
                "risk evaluation at the hospitals (DP): %s (%s) high-risk AUROC %.3f, macro-F1 %.3f",
                row["model"],
                row["route"],
                row["high_risk_auroc"],
                row["macro_f1"],
            )
    return {"rows": rows, "ledger": answers.ledgers, "refusals": answers.refusals}
