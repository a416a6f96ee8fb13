"""The node's risk evaluation: every model sent scores the held-out patients; one noisy, charged
release of count tables, once per federation; nothing else leaves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client.app import _setup, _split_cohort, evaluate
from client.egress import egress_problems
from client.risk_evaluation import EVALUATION_CHARGE
from configs import wire
from configs.settings import load_settings
from models.encoder import TabularEncoder
from models.risk.dp_scores import CONFUSION, FLAGGED, SCORE_EDGES, evaluation_tables
from models.risk.features import encode_patients, label_slice
from models.risk.neural import HybridLSTM, RiskTransformer
from models.statistics import histogram_counts
from server.export import FEDERATED_ROUTE, SYNTHETIC_ROUTE, TrainedRisk
from server.risk_evaluation import evaluation_request
from simulation.cohort import generate_demo_cohort, write_cohort_folder

pytestmark = pytest.mark.usefixtures("server_task_identity")
SMALL_LSTM = {"hidden_dim": 8, "lstm_hidden_dim": 4}
SMALL_TRANSFORMER = {"hidden_dim": 8, "heads": 2, "layers": 1, "feedforward_dim": 8}


@pytest.fixture
def node(tmp_path: Path) -> tuple[Context, RecordDict, list[TrainedRisk]]:
    """A hospital of 400 demo patients and an evaluation request for two untrained risk models."""
    cohort = generate_demo_cohort(400, seed=4)
    write_cohort_folder(cohort, tmp_path / "cohort" / "hospital-1")
    settings = load_settings(None)
    schema = settings.load_schema()
    encoder = TabularEncoder.from_histograms(schema, histogram_counts(cohort.static, schema))
    risk = [
        TrainedRisk(HybridLSTM(encoder, SMALL_LSTM, seed=1), FEDERATED_ROUTE),
        TrainedRisk(RiskTransformer(encoder, SMALL_TRANSFORMER, seed=2), SYNTHETIC_ROUTE),
    ]
    content = evaluation_request(risk, encoder, budget_share=0.5, federation_id="beef")
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config={"cohort-dir": str(tmp_path / "cohort"), "out-dir": str(tmp_path / "out")},
    )
    return context, content, risk


def _ask(context: Context, content: RecordDict) -> Message:
    message = Message(content, dst_node_id=1, message_type=wire.EVALUATE)
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink stamps it
    return evaluate(message, context)


def test_the_node_releases_noisy_tables_of_every_model_once_charged(node) -> None:
    context, content, risk = node
    reply = _ask(context, content)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert egress_problems(wire.EVALUATE, reply.content) == []
    tables = reply.content.array_records[wire.RISK_COUNTS]
    assert set(tables) == {f"{r.folder}.{t}" for r in risk for t in (CONFUSION, FLAGGED)}
    charge = json.loads(str(reply.content.config_records[wire.LEDGER]["json"]))[-1]
    assert charge["what"] == EVALUATION_CHARGE
    metrics = reply.content.metric_records[wire.METRICS]
    assert 0 < metrics["epsilon"] <= 5.0
    # The noise the node applied, seen from the exact tables the same models give here: residuals
    # spread like the announced sd, which covers sqrt(2 tables x 2 models) counts of one patient.
    settings, node_settings = _setup(context, Message(content, dst_node_id=1, message_type=wire.EVALUATE))
    _, holdout = _split_cohort(settings, node_settings)
    encoder = risk[0].model.encoder
    data = encode_patients(encoder, holdout.static, holdout.timeseries)
    truth = data.profiles[:, label_slice(encoder)].argmax(axis=1)
    residuals = []
    for r in risk:
        exact = evaluation_tables(r.model.predict_proba(data), truth, 3)
        for table in (CONFUSION, FLAGGED):
            residuals.append((tables[f"{r.folder}.{table}"].numpy() - exact[table]).ravel())
    spread = float(np.std(np.concatenate(residuals)))
    assert 0.6 * metrics["noise-sd"] < spread < 1.4 * metrics["noise-sd"]
    # the charge is at the noise that was applied
    assert charge["noise_multiplier"] == pytest.approx(metrics["noise-sd"] / math.sqrt(2 * len(risk)))
    assert tables[f"{risk[0].folder}.{FLAGGED}"].numpy().shape == (2, len(SCORE_EDGES) + 1)


def test_a_second_evaluation_of_the_same_federation_is_refused(node) -> None:
    context, content, _ = node
    assert not _ask(context, content).has_error()
    again = _ask(context, content)
    assert (
        again.has_error()
        and "answered the risk evaluation of federation 'beef' already" in again.error.reason
    )


def test_a_missing_model_state_is_refused_before_any_charge(node) -> None:
    context, content, risk = node
    del content.array_records[wire.RISK_MODEL_PREFIX + risk[1].folder]
    reply = _ask(context, content)
    assert reply.has_error() and risk[1].folder in reply.error.reason


def test_a_generator_in_place_of_a_risk_model_is_refused(node) -> None:
    context, content, _ = node
    config = content.config_records[wire.CONFIG]
    config["models"] = config["models"].replace('["hybrid-lstm"', '["dp-ctgan"', 1)
    reply = _ask(context, content)
    assert reply.has_error() and "needs risk models" in reply.error.reason
