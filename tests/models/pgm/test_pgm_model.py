"""Private-PGM end to end without Flower: two hospitals' noisy tables summed, estimated, sampled, saved."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from client.data import Cohort
from client.tasks import measure_round, measurement_plan
from configs.schema import load_schema
from configs.wire import MeasureRequest
from models.bundle import load_bundle, save_bundle
from models.encoder import EncoderError, TabularEncoder
from models.pgm.marginals import clique_key
from models.pgm.model import PrivatePGM
from models.statistics import histogram_counts
from privacy.ledger import PrivacyLedger
from simulation.cohort import generate_demo_cohort

SMALL = {"iterations": 1000}


@pytest.fixture(scope="module")
def fitted() -> tuple[PrivatePGM, list[PrivacyLedger]]:
    """pgm fitted from two hospitals' measurement rounds, exactly as the server drives them."""
    schema = load_schema()
    hospitals = [generate_demo_cohort(700, seed=s).static for s in (11, 12)]
    encoder = TabularEncoder.from_histograms(schema, histogram_counts(hospitals[0], schema))
    model = PrivatePGM(encoder, SMALL, seed=0)
    ledgers = [PrivacyLedger(max_epsilon=4.0, delta=1e-5) for _ in hospitals]
    plans: list = [None, None]
    weights = list(model.measurement_weights())
    for index in range(1, len(weights) + 1):
        cliques = [clique_key(c) for c in model.select_measurements(index, {})]
        request = MeasureRequest(
            model="pgm",
            cliques=cliques,
            round_index=index,
            weights=weights,
            budget_share=1.0,
            table_cells=model.measurement_table_cells(index),
        )
        total, variance = {}, 0.0
        for h, (static, ledger) in enumerate(zip(hospitals, ledgers, strict=True)):
            plans[h] = measurement_plan(ledger, request, plans[h])
            tables, z = measure_round(
                Cohort(static, None), schema, request, ledger=ledger, rho=plans[h]["rho"], seed=h
            )
            for key, table in tables.items():
                total[key] = total.get(key, 0.0) + table
            variance += z**2 * len(tables)
        model.observe(total, math.sqrt(variance))
    model.fit_statistics({})
    return model, ledgers


def test_each_hospital_spends_exactly_its_budget(fitted) -> None:
    _, ledgers = fitted
    for ledger in ledgers:
        assert [e.what for e in ledger.entries] == ["pgm measurement round 1", "pgm measurement round 2"]
        assert 3.99 < ledger.spent() <= 4.0 + 1e-9


def test_the_model_keeps_how_columns_go_together(fitted) -> None:
    model, _ = fitted
    rows = model.sample(4000, seed=1)
    assert list(rows.columns) == load_schema().column_names
    # the demo's risk level rises with depression; independent columns would give equal means
    means = rows.groupby("risk_level")["dass_depression"].mean()
    assert means["low"] + 5 < means["moderate"] < means["high"]


def test_same_seed_same_rows_and_sampling_leaves_numpy_alone(fitted) -> None:
    model, _ = fitted
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a, b = model.sample(300, seed=5), model.sample(300, seed=5)
    assert a.equals(b) and not a.equals(model.sample(300, seed=6))
    assert (np.random.get_state()[1] == before).all()


def test_sampling_by_label_changes_the_mix_not_the_profile_of_a_class(fitted) -> None:
    model, _ = fitted
    plain = model.sample(6000, seed=2)
    balanced = model.sample(6000, seed=2, label_shares={"high": 0.5})
    assert abs((balanced["risk_level"] == "high").mean() - 0.5) < 0.02
    high = [frame.loc[frame["risk_level"] == "high", "dass_depression"].mean() for frame in (plain, balanced)]
    assert abs(high[0] - high[1]) < 1.5
    with pytest.raises(EncoderError, match="label shares"):
        model.sample(10, seed=0, label_shares={"severe": 0.5})


def test_state_and_bundle_round_trip_give_the_same_rows(fitted, tmp_path: Path) -> None:
    model, _ = fitted
    state = model.state_dict()
    assert {k.split(".")[0] for k in state} == {"potential", "total"}  # no table, no record
    again = PrivatePGM(model.encoder, SMALL)
    again.load_state_dict(state)
    assert again.sample(200, seed=3).equals(model.sample(200, seed=3))
    save_bundle(tmp_path / "bundle", model=model, card={"name": "pgm-test"})
    loaded, card = load_bundle(tmp_path / "bundle")
    assert card["model"] == "pgm" and loaded.sample(200, seed=3).equals(model.sample(200, seed=3))
    with pytest.raises(KeyError, match="pgm state needs"):
        again.load_state_dict({"generator.weight": state["total"]})


def _request(index: int, weights: list[float], cliques: list[str] | None = None) -> MeasureRequest:
    return MeasureRequest(
        model="pgm", cliques=cliques or ["age"], round_index=index, weights=weights, budget_share=0.5
    )


def test_the_measurement_plan_is_pinned_at_the_first_round() -> None:
    ledger = PrivacyLedger(max_epsilon=4.0, delta=1e-5)
    plan = measurement_plan(ledger, _request(1, [0.3, 0.7]), None)
    assert plan["done"] == [1] and plan["weights"] == [0.3, 0.7]
    assert 0 < plan["target"] == pytest.approx(2.0)
    # a server that changes the split, or asks for a round twice, would overspend the model's share
    with pytest.raises(EncoderError, match="weights differ"):
        measurement_plan(ledger, _request(2, [0.1, 0.9]), plan)
    with pytest.raises(EncoderError, match="round 1 was measured already"):
        measurement_plan(ledger, _request(1, [0.3, 0.7]), plan)
    assert measurement_plan(ledger, _request(2, [0.3, 0.7]), plan)["done"] == [1, 2]


def test_a_column_set_asked_for_twice_is_refused_before_anything_is_charged() -> None:
    ledger = PrivacyLedger(max_epsilon=4.0, delta=1e-5)
    request = _request(1, [1.0], ["age", "age"])
    plan = measurement_plan(ledger, request, None)
    static = generate_demo_cohort(50, seed=1).static
    with pytest.raises(EncoderError, match="'age' is asked for twice"):
        measure_round(Cohort(static, None), load_schema(), request, ledger=ledger, rho=plan["rho"], seed=0)
    assert ledger.entries == []


def test_aim_shares_must_leave_the_chosen_tables_a_share() -> None:
    with pytest.raises(ValueError, match="survey_share \\+ aim_share"):
        PrivatePGM.Config(selection="aim", survey_share=0.6, aim_share=0.5)
