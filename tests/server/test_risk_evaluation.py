"""The server's side of the risk evaluation: replies checked by name, hospitals pooled by summing
their noisy tables, and the latest ledger of each hospital kept."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from configs import wire
from models.risk.dp_scores import CONFUSION, FLAGGED, SCORE_EDGES
from server.audit import latest_ledgers
from server.report_gates import POOLED
from server.risk_evaluation import EvaluationAnswers, _reply_tables, evaluation_rows

FOLDERS = ["hybrid-lstm", "gbm-on-synthetic"]
GOOD = {CONFUSION: np.full((3, 3), 10.0), FLAGGED: np.full((2, len(SCORE_EDGES) + 1), 5.0)}


def _reply(tables: dict[str, np.ndarray], noise_sd: float = 4.0) -> Message:
    request = Message(RecordDict(), dst_node_id=1, message_type=wire.EVALUATE)
    request.metadata.__dict__["_message_id"] = request.object_id  # as the SuperLink stamps it
    content = RecordDict(
        {
            wire.RISK_COUNTS: ArrayRecord({k: Array(v) for k, v in tables.items()}),
            wire.METRICS: MetricRecord({"epsilon": 5.0, "noise-sd": noise_sd}),
        }
    )
    return Message(content, reply_to=request)


def _tables(changes: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    return {**{f"{f}.{t}": v for f in FOLDERS for t, v in GOOD.items()}, **(changes or {})}


@pytest.mark.usefixtures("server_task_identity")
def test_a_well_formed_reply_gives_every_models_tables() -> None:
    tables, noise_sd = _reply_tables(_reply(_tables()), FOLDERS, 3)
    assert set(tables) == set(FOLDERS) and noise_sd == 4.0
    assert np.array_equal(tables["gbm-on-synthetic"][FLAGGED], GOOD[FLAGGED])


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize(
    ("tables", "noise_sd", "reason"),
    [
        (_tables({"gbm-on-synthetic.confusion": np.ones((2, 3))}), 4.0, "shape"),
        (
            {k: v for k, v in _tables().items() if k != "hybrid-lstm.flagged"},
            4.0,
            "'hybrid-lstm.flagged' is missing",
        ),
        (_tables({"hybrid-lstm.confusion": np.full((3, 3), np.inf)}), 4.0, "not finite"),
        (_tables(), -1.0, "negative"),
    ],
)
def test_a_malformed_reply_is_refused_by_name(tables: dict, noise_sd: float, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        _reply_tables(_reply(tables, noise_sd), FOLDERS, 3)


def test_pooled_rows_sum_the_hospitals_tables_and_their_noise_in_quadrature() -> None:
    class _Model:
        registry_name = "hybrid-lstm"

    class _Trained:  # what evaluation_rows reads of a TrainedRisk
        model, route, folder = _Model(), "federated-dp", "hybrid-lstm"

    answers = EvaluationAnswers(
        tables={
            "h1": {"hybrid-lstm": {CONFUSION: np.diag([30.0, 20.0, 10.0]), FLAGGED: GOOD[FLAGGED]}},
            "h2": {"hybrid-lstm": {CONFUSION: np.diag([10.0, 10.0, 10.0]), FLAGGED: GOOD[FLAGGED]}},
        },
        noise_sd={"h1": 3.0, "h2": 4.0},
    )
    rows = {row["hospital"]: row for row in evaluation_rows(answers, [_Trained()])}
    assert set(rows) == {"h1", "h2", POOLED}
    assert rows[POOLED]["patients"] == 90.0 and rows[POOLED]["noise_sd"] == pytest.approx(5.0)
    assert rows[POOLED]["accuracy"] == 1.0 and rows[POOLED]["macro_f1"] == 1.0


def test_the_latest_ledger_of_each_hospital_is_kept() -> None:
    earlier = [{"hospital": "h1", "epsilon": 4.0}, {"hospital": "h2", "epsilon": 4.1}]
    later = [{"hospital": "h2", "epsilon": 5.0}]
    assert latest_ledgers(earlier, later) == [
        {"hospital": "h1", "epsilon": 4.0},
        {"hospital": "h2", "epsilon": 5.0},
    ]
