"""The risk models' contract, parametrised over every registered risk model: shapes, state,
bundles, the profile-only variant, DP-SGD's charge, and mixed precision on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from configs.schema import CohortSchema, load_schema
from models.base import LocalData, LocalRound, ModelKind, contract_problems
from models.bundle import load_bundle, save_bundle
from models.encoder import EncoderError, TabularEncoder
from models.registry import get_model_class, registered_models
from models.risk.features import encode_patients, targets
from models.risk.scores import risk_scores
from models.statistics import histogram_counts
from privacy.dp_training import DPSpec
from privacy.ledger import PrivacyLedger
from simulation.cohort import generate_demo_cohort
from tests.support.autocast import bf16_on_cpu

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

RISK_MODELS = [m for m in registered_models() if get_model_class(m).kind == ModelKind.RISK_MODEL]
FEDERATED = [m for m in RISK_MODELS if getattr(get_model_class(m), "federated", True)]
CPU = torch.device("cpu")
# Small and quick: every fit well under a few seconds on one thread.
SMALL: dict[str, dict[str, Any]] = {
    "hybrid-lstm": {"hidden_dim": 16, "lstm_hidden_dim": 8, "synthetic_epochs": 20},
    "transformer": {"hidden_dim": 16, "heads": 2, "layers": 1, "feedforward_dim": 16, "synthetic_epochs": 20},
    "gbm": {"max_iter": 40},
}


@pytest.fixture(scope="module")
def schema() -> CohortSchema:
    return load_schema()


@pytest.fixture(scope="module")
def encoder(schema: CohortSchema) -> TabularEncoder:
    static = generate_demo_cohort(600, seed=21).static
    return TabularEncoder.from_histograms(schema, histogram_counts(static, schema))


@pytest.fixture(scope="module")
def train(encoder: TabularEncoder) -> LocalData:
    cohort = generate_demo_cohort(600, seed=21)
    return encode_patients(encoder, cohort.static, cohort.timeseries)


@pytest.fixture(scope="module")
def test_data(encoder: TabularEncoder) -> LocalData:
    cohort = generate_demo_cohort(300, seed=22)
    return encode_patients(encoder, cohort.static, cohort.timeseries)


def _build(name: str, encoder: TabularEncoder, **params: Any) -> Any:
    return get_model_class(name)(encoder, {**SMALL.get(name, {}), **params}, seed=3)


@pytest.fixture(scope="module")
def fitted(encoder: TabularEncoder, train: LocalData) -> dict[str, Any]:
    models = {}
    for name in RISK_MODELS:
        model = _build(name, encoder)
        model.fit_offline(train, seed=0, device=CPU)
        models[name] = model
    return models


def test_the_three_risk_models_are_registered() -> None:
    assert {"hybrid-lstm", "transformer", "gbm"} <= set(RISK_MODELS)


@pytest.mark.parametrize("name", RISK_MODELS)
def test_each_risk_model_keeps_the_contract(name: str) -> None:
    assert contract_problems(get_model_class(name)) == []


@pytest.mark.parametrize("name", RISK_MODELS)
def test_probabilities_have_a_row_per_patient_summing_to_one(
    name: str, fitted: dict[str, Any], test_data: LocalData
) -> None:
    probabilities = fitted[name].predict_proba(test_data)
    assert probabilities.shape == (len(test_data.profiles), 3)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", RISK_MODELS)
def test_a_fitted_model_ranks_real_patients_far_above_chance(
    name: str, fitted: dict[str, Any], test_data: LocalData
) -> None:
    model = fitted[name]
    scores = risk_scores(model.predict_proba(test_data), targets(test_data.profiles, model.label), 3)
    assert scores["auroc"] > 0.85, scores


@pytest.mark.parametrize("name", RISK_MODELS)
def test_the_label_block_is_never_read(name: str, fitted: dict[str, Any], test_data: LocalData) -> None:
    model = fitted[name]
    scrambled = test_data.profiles.copy()
    scrambled[:, model.label] = np.roll(scrambled[:, model.label], 1, axis=1)
    again = model.predict_proba(LocalData(scrambled, test_data.weeks))
    np.testing.assert_allclose(again, model.predict_proba(test_data), atol=1e-6)


@pytest.mark.parametrize("name", RISK_MODELS)
def test_state_and_bundle_round_trips_predict_the_same(
    name: str, fitted: dict[str, Any], encoder: TabularEncoder, test_data: LocalData, tmp_path: Path
) -> None:
    model = fitted[name]
    expected = model.predict_proba(test_data)
    fresh = _build(name, encoder)
    fresh.load_state_dict(model.state_dict())
    np.testing.assert_allclose(fresh.predict_proba(test_data), expected, atol=1e-6)
    save_bundle(tmp_path / "risk", model=model, card={"route": "synthetic"})
    loaded, card = load_bundle(tmp_path / "risk")
    assert card["model"] == name and card["route"] == "synthetic"
    np.testing.assert_allclose(loaded.predict_proba(test_data), expected, atol=1e-6)


@pytest.mark.parametrize("name", RISK_MODELS)
def test_a_model_that_reads_the_week_refuses_profiles_alone(
    name: str, fitted: dict[str, Any], test_data: LocalData
) -> None:
    with pytest.raises(EncoderError, match="week"):
        fitted[name].predict_proba(LocalData(test_data.profiles))


@pytest.mark.parametrize("name", RISK_MODELS)
def test_a_schema_without_a_sequence_trains_the_profile_only_variant(name: str, schema: CohortSchema) -> None:
    no_weeks = schema.model_copy(update={"sequence": None})
    cohort = generate_demo_cohort(300, seed=5)
    encoder = TabularEncoder.from_histograms(no_weeks, histogram_counts(cohort.static, no_weeks))
    data = encode_patients(encoder, cohort.static, None)
    assert data.weeks is None
    model = _build(name, encoder)
    assert not model.uses_week
    model.fit_offline(data, seed=0, device=CPU)
    assert model.predict_proba(data).shape == (300, 3)


@pytest.mark.parametrize("name", FEDERATED)
def test_a_federated_round_charges_dp_sgd_to_the_ledger(
    name: str, encoder: TabularEncoder, train: LocalData
) -> None:
    ledger = PrivacyLedger(max_epsilon=5.0, delta=1e-5)
    model = _build(name, encoder)
    dp = DPSpec(noise_multiplier=1.5, clipping_norm=1.0, ledger=ledger, label=f"{name} round 1")
    plan = LocalRound(epochs=1, batch_size=64, dp=dp, device=CPU, seed=0)
    report = model.fit_round(train, plan)
    assert report.steps > 0
    assert 0 < ledger.spent() < 5.0


@pytest.mark.parametrize("name", FEDERATED)
def test_the_synthetic_route_charges_nothing(name: str, encoder: TabularEncoder, train: LocalData) -> None:
    ledger = PrivacyLedger(max_epsilon=5.0, delta=1e-5)
    _build(name, encoder).fit_offline(train, seed=0, device=CPU)  # takes no ledger at all
    assert ledger.spent() == 0.0 and ledger.accountant.history == []


def test_gbm_cannot_be_a_federated_stage(encoder: TabularEncoder, train: LocalData) -> None:
    plan = LocalRound(epochs=1, batch_size=64, dp=None, device=CPU, seed=0)
    with pytest.raises(EncoderError, match="synthetic cohort only"):
        _build("gbm", encoder).fit_round(train, plan)


@pytest.mark.parametrize("name", FEDERATED)
def test_a_dp_training_step_runs_with_bf16_forward_passes(
    name: str, encoder: TabularEncoder, train: LocalData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path CUDA takes (`models.runtime.autocast_for`: bf16 forward, fp32 step), on CPU."""
    import models.risk.neural

    monkeypatch.setattr(models.risk.neural, "autocast_for", bf16_on_cpu)
    ledger = PrivacyLedger(max_epsilon=5.0, delta=1e-5)
    model = _build(name, encoder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = DPSpec(noise_multiplier=1.5, clipping_norm=1.0, ledger=ledger)
    model.fit_round(train, LocalRound(epochs=1, batch_size=128, dp=dp, device=CPU, seed=0))
    after = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # master weights stay fp32
    assert any(not torch.equal(v, before[k]) for k, v in after.items())
    assert ledger.spent() > 0


def test_gbm_walks_its_trees_as_scikit_learn_does(encoder: TabularEncoder, train: LocalData) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from models.risk import gbm

    model = _build("gbm", encoder)
    features = model._features(train)
    estimator = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(
        features, targets(train.profiles, model.label)
    )
    trees = gbm._tree_arrays(estimator, 3)
    ours = gbm._probabilities(gbm._raw_scores(trees, features.astype(np.float64)), 3)
    np.testing.assert_allclose(ours, estimator.predict_proba(features), atol=1e-9)
