"""The contract every registered generator keeps: state, sampling, (DP) fitting and bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from configs.schema import CohortSchema, load_schema
from models import registry
from models.base import ROUND_KINDS, ModelKind, contract_problems
from models.bundle import CARD_FILE, WEIGHTS_FILE, BundleError, load_bundle, save_bundle
from models.encoder import TabularEncoder
from models.registry import get_model_class, register, registered_models
from models.statistics import histogram_counts
from privacy.dp_training import DPSpec
from privacy.facade import steps_per_epoch
from privacy.ledger import BudgetExceededError, PrivacyLedger
from simulation.cohort import generate_demo_cohort
from tests.support.round_models import TINY

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

MODELS = registered_models()
# Every model keeps its kind's contract (models.base); the static-table tests below are for the
# federated generators (sequence models have their own in tests/models/sequence).
STATIC_MODELS = [m for m in MODELS if get_model_class(m).kind == ModelKind.FEDERATED_GENERATOR]
CPU = torch.device("cpu")
N_ROWS = 200
BATCH = 50
DELTA = 1e-5
# Small networks keep every fit well under a second on one CPU thread.
SMALL = TINY


@pytest.fixture(scope="module")
def schema() -> CohortSchema:
    return load_schema()


@pytest.fixture(scope="module")
def encoder(schema: CohortSchema) -> TabularEncoder:
    static = generate_demo_cohort(N_ROWS, seed=21).static
    # DP-like statistics: the true counts plus a little noise (negatives are clipped by the encoder).
    rng = np.random.default_rng(0)
    noisy = {k: v + rng.normal(0, 2.0, v.shape) for k, v in histogram_counts(static, schema).items()}
    return TabularEncoder.from_histograms(schema, noisy)


@pytest.fixture(scope="module")
def data(encoder: TabularEncoder) -> np.ndarray:
    return encoder.transform(generate_demo_cohort(N_ROWS, seed=21).static)


def _params(name: str) -> dict[str, Any]:
    fields = get_model_class(name).Config.model_fields
    return {k: v for k, v in SMALL.items() if k in fields}


def _build(name: str, encoder: TabularEncoder, **kwargs: Any) -> Any:
    return get_model_class(name)(encoder, _params(name), **kwargs)


def _fit(model: Any, data: np.ndarray, *, dp: DPSpec | None = None, seed: int = 0) -> Any:
    return model.fit(data, epochs=1, batch_size=BATCH, dp=dp, device=CPU, seed=seed)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(encoder: TabularEncoder, data: np.ndarray) -> dict[str, Any]:
    """One non-DP epoch per model (module-scoped: tests below must not train it further)."""
    models = {}
    for name in STATIC_MODELS:
        model = _build(name, encoder)
        _fit(model, data)
        models[name] = model
    return models


def test_builtin_model_is_registered() -> None:
    assert "dp-ctgan" in STATIC_MODELS


@pytest.mark.parametrize("name", MODELS)
def test_every_model_keeps_the_generic_contract(name: str, encoder: TabularEncoder) -> None:
    cls = get_model_class(name)
    assert cls.registry_name == name
    cls.Config()  # every knob has a default
    assert contract_problems(cls) == []
    a, b = _build(name, encoder, seed=1), _build(name, encoder, seed=2)
    assert a.config == cls.Config(**_params(name))
    assert a.encoder is encoder
    if cls.kind in ROUND_KINDS and getattr(cls, "federated", True):
        # federated round models start from a seeded random initialisation
        assert not _states_equal(a.state_dict(), b.state_dict())
    b.load_state_dict(a.state_dict())
    assert _states_equal(a.state_dict(), b.state_dict())
    if hasattr(cls, "sampler_state_dict"):  # generators export their sampler only
        sampler = a.sampler_state_dict()
        assert sampler and set(sampler) <= set(a.state_dict())
    with pytest.raises(KeyError):
        b.load_state_dict({"no-such-module.weight": torch.zeros(1)})


def test_unknown_model_name_lists_registered_ones() -> None:
    with pytest.raises(KeyError, match="dp-ctgan"):
        get_model_class("no-such-model")


def test_registering_a_duplicate_name_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # leave the real one untouched

    @register("contract-test-throwaway")
    class Throwaway:
        pass

    assert get_model_class("contract-test-throwaway") is Throwaway
    assert Throwaway.registry_name == "contract-test-throwaway"

    class Another:
        pass

    with pytest.raises(ValueError, match="contract-test-throwaway"):
        register("contract-test-throwaway")(Another)
    with pytest.raises(ValueError, match="dp-ctgan"):
        register("dp-ctgan")(Another)
    assert get_model_class("contract-test-throwaway") is Throwaway


# ---------------------------------------------------------------- state
@pytest.mark.parametrize("name", STATIC_MODELS)
def test_state_dict_round_trip_gives_identical_samples(
    name: str, encoder: TabularEncoder, trained: dict[str, Any]
) -> None:
    model = trained[name]
    fresh = _build(name, encoder)
    assert not _states_equal(fresh.state_dict(), model.state_dict())  # training moved the weights
    fresh.load_state_dict(model.state_dict())
    assert _states_equal(fresh.state_dict(), model.state_dict())
    pd.testing.assert_frame_equal(fresh.sample(64, seed=5), model.sample(64, seed=5))


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_state_dict_is_a_detached_copy(name: str, trained: dict[str, Any]) -> None:
    model = trained[name]
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.add_(1.0)
    assert _states_equal(model.state_dict(), before)
    assert all(not t.requires_grad and t.device.type == "cpu" for t in model.state_dict().values())


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_sampler_state_is_a_subset_of_the_state(name: str, trained: dict[str, Any]) -> None:
    model = trained[name]
    sampler, full = model.sampler_state_dict(), model.state_dict()
    assert sampler and set(sampler) <= set(full)
    assert all(torch.equal(sampler[k], full[k]) for k in sampler)


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", STATIC_MODELS)
@pytest.mark.parametrize("n", [1, 37, 1005])
def test_sample_has_schema_columns_inside_ranges(
    name: str, n: int, schema: CohortSchema, trained: dict[str, Any]
) -> None:
    frame = trained[name].sample(n, seed=n)
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == n
    assert list(frame.columns) == schema.column_names
    for spec in schema.columns:
        values = frame[spec.name]
        assert values.notna().all(), spec.name
        if spec.is_categorical:
            assert set(values) <= set(spec.categories or ()), spec.name
        else:
            assert values.between(spec.min, spec.max).all(), spec.name
            if spec.kind == "integer":
                assert values.dtype == np.int64, spec.name
            else:
                assert values.dtype == np.float64, spec.name


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_sample_of_zero_rows(name: str, schema: CohortSchema, trained: dict[str, Any]) -> None:
    frame = trained[name].sample(0, seed=0)
    assert len(frame) == 0
    assert list(frame.columns) == schema.column_names


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_same_seed_same_rows_different_seed_different_rows(name: str, trained: dict[str, Any]) -> None:
    model = trained[name]
    first = model.sample(100, seed=11)
    torch.manual_seed(999)  # global RNG state in between must not matter
    np.random.seed(999)
    model.sample(17, seed=3)
    pd.testing.assert_frame_equal(model.sample(100, seed=11), first)
    assert not model.sample(100, seed=12).equals(first)


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_sampling_does_not_change_the_state(name: str, trained: dict[str, Any]) -> None:
    model = trained[name]
    before = model.state_dict()
    model.sample(300, seed=1)
    assert _states_equal(model.state_dict(), before)


# ---------------------------------------------------------------- fitting
@pytest.mark.parametrize("name", STATIC_MODELS)
def test_fit_without_dp_runs_and_reports(name: str, encoder: TabularEncoder, data: np.ndarray) -> None:
    model = _build(name, encoder)
    before = model.state_dict()
    report = _fit(model, data)
    assert report.steps == steps_per_epoch(N_ROWS, BATCH) > 0
    assert report.records_seen == N_ROWS
    assert np.isfinite(report.discriminator_loss_sum) and np.isfinite(report.generator_loss_sum)
    metrics = report.as_metrics()
    assert metrics["steps"] == float(report.steps)
    assert all(isinstance(v, float) for v in metrics.values())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert not _states_equal(after, before)


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_fit_is_reproducible_for_a_seed(name: str, encoder: TabularEncoder, data: np.ndarray) -> None:
    a, b = _build(name, encoder), _build(name, encoder)
    _fit(a, data, seed=4)
    _fit(b, data, seed=4)
    assert _states_equal(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_fit_with_dp_charges_the_ledger(name: str, encoder: TabularEncoder, data: np.ndarray) -> None:
    model = _build(name, encoder)
    ledger = PrivacyLedger(max_epsilon=50.0, delta=DELTA)
    sigma, steps = 1.0, steps_per_epoch(N_ROWS, BATCH)
    predicted = ledger.epsilon_if(noise_multiplier=sigma, sample_rate=1 / steps, steps=steps)
    keys = set(model.state_dict())
    assert ledger.spent() == 0.0

    report = _fit(model, data, dp=DPSpec(noise_multiplier=sigma, clipping_norm=1.0, ledger=ledger))
    assert report.steps == steps
    first = ledger.spent()
    assert first > 0.0
    assert first == pytest.approx(predicted, rel=1e-9)
    assert [(e.mechanism, e.steps) for e in ledger.entries] == [("dp-sgd", steps)]
    assert ledger.entries[0].epsilon_after == pytest.approx(first)
    # the DP wrapper is removed: the federation averages the same keys as before
    assert set(model.state_dict()) == keys

    # a second local fit composes on the same ledger
    _fit(model, data, dp=DPSpec(noise_multiplier=sigma, clipping_norm=1.0, ledger=ledger), seed=1)
    assert ledger.spent() > first
    assert len(ledger.entries) == 2
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_fit_over_budget_is_refused_and_changes_nothing(
    name: str, encoder: TabularEncoder, data: np.ndarray
) -> None:
    model = _build(name, encoder)
    _fit(model, data)  # non-DP warm-up so the state is not just the initialisation
    ledger = PrivacyLedger(max_epsilon=2.0, delta=DELTA)
    ledger.charge_gaussian("handshake statistics", noise_multiplier=10.0)
    spent, history, n_entries = ledger.spent(), list(ledger.accountant.history), len(ledger.entries)
    assert 0.0 < spent < 2.0
    steps = steps_per_epoch(N_ROWS, BATCH)
    assert ledger.epsilon_if(noise_multiplier=1.0, sample_rate=1 / steps, steps=steps) > 2.0
    before = model.state_dict()

    with pytest.raises(BudgetExceededError, match="max epsilon"):
        _fit(model, data, dp=DPSpec(noise_multiplier=1.0, clipping_norm=1.0, ledger=ledger))

    assert ledger.spent() == spent
    assert ledger.accountant.history == history
    assert len(ledger.entries) == n_entries
    assert _states_equal(model.state_dict(), before)
    # the refused model is still usable
    assert _fit(model, data).steps == steps


# ---------------------------------------------------------------- bundles
@pytest.mark.parametrize("name", STATIC_MODELS)
def test_bundle_round_trip_gives_identical_samples(
    name: str, tmp_path: Path, trained: dict[str, Any]
) -> None:
    model = trained[name]
    folder = tmp_path / "bundle"
    card = save_bundle(folder, model=model, card={"name": "contract-test"})
    assert card["name"] == "contract-test"
    assert card["model"] == name
    assert card["encoder_hash"] == model.encoder.hash
    assert card["schema_hash"] == model.encoder.schema.schema_hash()
    assert json.loads((folder / CARD_FILE).read_text(encoding="utf-8")) == card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    loaded, loaded_card = load_bundle(folder)
    assert loaded_card == card
    assert loaded.registry_name == name
    assert loaded.encoder.hash == model.encoder.hash
    assert _states_equal(loaded.sampler_state_dict(), model.sampler_state_dict())
    pd.testing.assert_frame_equal(loaded.sample(80, seed=2), model.sample(80, seed=2))


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_bundle_carries_only_the_sampler(name: str, tmp_path: Path, trained: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    model = trained[name]
    save_bundle(tmp_path / "bundle", model=model, card={"name": "x"})
    stored = load_file(str(tmp_path / "bundle" / WEIGHTS_FILE))
    assert set(stored) == set(model.sampler_state_dict())


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_tampered_weights_are_refused(name: str, tmp_path: Path, trained: dict[str, Any]) -> None:
    folder = tmp_path / "bundle"
    card = save_bundle(folder, model=trained[name], card={"name": "x"})
    weights = folder / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=WEIGHTS_FILE.replace(".", r"\.")) as info:
        load_bundle(folder)
    assert "SHA-256" in str(info.value)
    assert set(card["files"]) >= {WEIGHTS_FILE}


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_every_bundle_file_is_hash_checked(name: str, tmp_path: Path, trained: dict[str, Any]) -> None:
    folder = tmp_path / "bundle"
    card = save_bundle(folder, model=trained[name], card={"name": "x"})
    assert len(card["files"]) >= 3
    for file_name in card["files"]:
        path = folder / file_name
        original = path.read_bytes()
        path.write_bytes(original + b" ")
        with pytest.raises(BundleError, match=file_name.replace(".", r"\.")):
            load_bundle(folder)
        path.unlink()
        with pytest.raises(BundleError, match="is missing"):
            load_bundle(folder)
        path.write_bytes(original)
    load_bundle(folder)  # restored: loads again


def test_folder_without_a_card_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_card_that_is_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / CARD_FILE).write_bytes(b"\xff\xfe not json")
    with pytest.raises(BundleError, match="not a valid JSON model card"):
        load_bundle(tmp_path)


def test_card_without_file_hashes_is_refused(tmp_path: Path) -> None:
    (tmp_path / CARD_FILE).write_text("{}", encoding="utf-8")
    with pytest.raises(BundleError):
        load_bundle(tmp_path)


def test_the_contract_check_names_what_a_model_lacks() -> None:
    class Half:
        kind = ModelKind.RISK_MODEL
        registry_name = "half"
        releases = ()
        phases = ()

        def state_dict(self) -> dict:
            return {}

    problems = contract_problems(Half)
    assert {"missing 'predict_proba'", "missing 'fit_round'", "missing 'Config'"} <= set(problems)
    assert "missing 'state_dict'" not in problems
    assert contract_problems(type("NoKind", (), {"kind": "sequence"})) == [
        "'kind' must be a ModelKind, got 'sequence'"
    ]


@pytest.mark.parametrize("name", STATIC_MODELS)
def test_every_table_model_takes_pair_targets(name: str, encoder: TabularEncoder, data: np.ndarray) -> None:
    """The client hands the server's DP pair correlations to whichever table model runs."""
    model = _build(name, encoder)
    report = model.fit(
        data, epochs=1, batch_size=BATCH, dp=None, device=CPU, seed=0, pair_targets={"age|bmi": 0.1}
    )
    assert report.steps >= 0
