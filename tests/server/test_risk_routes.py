"""Both risk routes in the session's tiny federation: what is bundled, what each route cost."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.bundle import load_bundle
from tests.support.egress import egress_violations
from tests.support.runs import TINY

pytestmark = pytest.mark.integration


def test_each_route_is_bundled_with_its_route(tiny_recorded_run) -> None:
    outcome, _ = tiny_recorded_run
    risk = outcome.out_dir / "bundle" / "risk"
    expected = {
        "hybrid-lstm": "federated-dp",
        "hybrid-lstm-on-synthetic": "synthetic",
        "gbm-on-synthetic": "synthetic",
    }
    assert {p.name for p in risk.iterdir()} == set(expected)
    for folder, route in expected.items():
        model, card = load_bundle(risk / folder)
        assert card["route"] == route and model.registry_name == folder.removesuffix("-on-synthetic")
    synthetic_card = json.loads((risk / "gbm-on-synthetic" / "model_card.json").read_text())
    assert synthetic_card["training_epsilon"] == 0.0


def test_dp_sgd_of_the_federated_route_is_in_every_ledger_and_the_synthetic_route_is_not(
    tiny_recorded_run,
) -> None:
    outcome, _ = tiny_recorded_run
    card = json.loads((outcome.out_dir / "bundle" / "model_card.json").read_text())
    for ledger in card["privacy"]["ledger"]:
        what = [entry["what"] for entry in ledger["entries"]]
        assert sum("hybrid-lstm" in w for w in what) == TINY["stages.hybrid-lstm.rounds"]
        assert not any("gbm" in w or "synthetic" in w for w in what)


def test_the_risk_round_replies_carry_only_weights_and_epsilon(tiny_recorded_run) -> None:
    _, replies = tiny_recorded_run
    risk = [r for r in replies if r.metadata.message_type == "train.risk"]
    assert len(risk) == TINY["federation.hospitals"] * TINY["stages.hybrid-lstm.rounds"]
    assert egress_violations(risk) == []


def test_demo_check_scores_every_route_beside_its_ceiling(tiny_recorded_run) -> None:
    outcome, _ = tiny_recorded_run
    rows = outcome.metrics["demo_check"]["risk"]
    routes = {(r["model"], r["route"]) for r in rows}
    assert {("hybrid-lstm", "federated-dp"), ("hybrid-lstm", "synthetic"), ("gbm", "synthetic")} <= routes
    assert ("hybrid-lstm", "ceiling (real cohort, no DP) (profile only)") in routes
    for hospital in range(1, TINY["federation.hospitals"] + 1):  # what each could do alone
        assert ("gbm", f"one hospital alone, no DP (hospital-{hospital})") in routes
    for row in rows:
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["brier"] <= 2.0


def test_each_hospital_scored_every_route_on_its_held_out_patients_under_dp(tiny_recorded_run) -> None:
    outcome, replies = tiny_recorded_run
    evaluation = outcome.metrics["risk_evaluation"]
    hospitals = {f"hospital-{i}" for i in range(1, TINY["federation.hospitals"] + 1)}
    rows = {(r["model"], r["route"], r["hospital"]): r for r in evaluation["rows"]}
    for model, route in [("hybrid-lstm", "federated-dp"), ("hybrid-lstm", "synthetic"), ("gbm", "synthetic")]:
        for where in [*hospitals, "all hospitals"]:
            row = rows[(model, route, where)]
            assert 0.0 <= row["high_risk_auroc"] <= 1.0 and row["noise_sd"] > 0
            assert np.asarray(row["confusion"]).shape == (3, 3)
    # one charged release per hospital, the last charge of each ledger, and within the budget
    assert evaluation["refusals"] == []
    for ledger in evaluation["ledger"]:
        assert ledger["entries"][-1]["what"] == "risk evaluation" and ledger["epsilon"] <= 5.0 + 1e-9
    answers = [r for r in replies if r.metadata.message_type == "query.evaluate"]
    assert len(answers) == len(hospitals) and egress_violations(answers) == []
    # the card's epsilon per hospital includes the evaluation's charge
    final = {h["hospital"]: h["epsilon"] for h in outcome.metrics["hospitals"]}
    assert final == {ledger["hospital"]: ledger["epsilon"] for ledger in evaluation["ledger"]}


def test_the_report_shows_the_hospitals_evaluation_and_keeps_it_for_a_redraw(tiny_recorded_run) -> None:
    outcome, _ = tiny_recorded_run
    report = json.loads((outcome.out_dir / "report.json").read_text())
    assert report["risk_models"]["rows"] == json.loads(json.dumps(outcome.metrics["risk_evaluation"]["rows"]))
    assert all(row["entries"][-1]["what"] == "risk evaluation" for row in report["ledger"])
    html = (outcome.out_dir / "report.html").read_text()
    section = html[html.index('id="risk-models"') :]
    assert 'id="risk-table"' in section and section.count("data:image/png;base64,") >= 2
    saved = json.loads((outcome.out_dir / "audit_inputs.json").read_text())
    assert saved["risk_evaluation"]["rows"] == report["risk_models"]["rows"]
