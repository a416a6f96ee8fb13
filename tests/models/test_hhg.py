"""HHG: fine positions, values kept in the coarse cells, DP charges per phase, public fakes, state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from configs.schema import CohortSchema, load_schema
from models.base import LocalData, LocalRound
from models.bundle import load_bundle, save_bundle
from models.encoder import TabularEncoder
from models.hhg.fine import FineLayout, decoded_rows, independent_cells
from models.hhg.model import PHASES, HybridGenerator
from models.hhg.networks import cosine_alpha_bars, ddpm_sample
from models.pgm.domain import to_cells
from models.pgm.model import PrivatePGM
from models.statistics import histogram_counts
from privacy.dp_training import DPSpec
from privacy.facade import steps_per_epoch
from privacy.ledger import PrivacyLedger
from simulation.cohort import generate_demo_cohort
from tests.support.autocast import bf16_on_cpu

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

CPU = torch.device("cpu")
N_ROWS, BATCH = 200, 50
SMALL = {"hidden_dim": 8, "latent_dim": 4, "diffusion_steps": 8}
# Which networks each phase may change (the refiner learns with the discriminator).
TRAINED_IN = {"vae": {"vae"}, "diffusion": {"denoiser"}, "refine": {"discriminator", "refiner"}}


@pytest.fixture(scope="module")
def schema() -> CohortSchema:
    return load_schema()


@pytest.fixture(scope="module")
def static() -> pd.DataFrame:
    return generate_demo_cohort(N_ROWS, seed=21).static


@pytest.fixture(scope="module")
def encoder(schema: CohortSchema, static: pd.DataFrame) -> TabularEncoder:
    return TabularEncoder.from_histograms(schema, histogram_counts(static, schema))


@pytest.fixture(scope="module")
def data(encoder: TabularEncoder, static: pd.DataFrame) -> np.ndarray:
    return encoder.transform(static)


@pytest.fixture(scope="module")
def trained(encoder: TabularEncoder, data: np.ndarray) -> HybridGenerator:
    """All three networks, one non-DP epoch (module-scoped: tests copy it, never train it)."""
    model = HybridGenerator(encoder, SMALL, seed=0)
    model.fit(data, epochs=1, batch_size=BATCH, dp=None, device=CPU, seed=0)
    return model


@pytest.fixture(scope="module")
def coarse(encoder: TabularEncoder, static: pd.DataFrame, schema: CohortSchema) -> PrivatePGM:
    """A real PrivatePGM given potentials directly (log counts of the one-way tables and of
    depression x label), so no estimation run is needed."""
    counts = histogram_counts(static, schema)
    potentials = {f"potential.{n}": np.log(counts[n] + 1.0) for n in schema.column_names}
    cells = to_cells(static, schema)
    depression, label = (schema.column_names.index(n) for n in ("dass_depression", "risk_level"))
    table = np.zeros((schema.columns[depression].n_cells(), schema.columns[label].n_cells()))
    np.add.at(table, (cells[:, depression], cells[:, label]), 1.0)
    potentials["potential.dass_depression|risk_level"] = np.log(table + 1.0)
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in potentials.items()}
    state["total"] = torch.tensor(float(N_ROWS), dtype=torch.float64)
    model = PrivatePGM(encoder, {})
    model.load_state_dict(state)
    return model


def _copy(model: HybridGenerator, **config: Any) -> HybridGenerator:
    fresh = HybridGenerator(model.encoder, model.config.model_copy(update=config), seed=5)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _dp(ledger: PrivacyLedger) -> DPSpec:
    return DPSpec(noise_multiplier=1.0, clipping_norm=1.0, ledger=ledger)


# ---------------------------------------------------------------- cells and positions
def test_cells_and_positions_round_trip_to_the_same_values(
    schema: CohortSchema, static: pd.DataFrame
) -> None:
    layout = FineLayout(schema)
    assert [bins.name for bins in layout.fine] == ["age", "bmi"]  # DASS bins hold one value each
    cells, positions = layout.cells_and_positions(static)
    assert ((positions > 0) & (positions < 1)).all()
    frame = layout.values(cells, positions)
    for spec in schema.columns:
        if spec.kind == "continuous":
            np.testing.assert_allclose(frame[spec.name], static[spec.name], atol=1e-4)
        else:
            assert frame[spec.name].tolist() == static[spec.name].tolist(), spec.name
    again_cells, again_positions = layout.cells_and_positions(frame)
    np.testing.assert_array_equal(again_cells, cells)
    np.testing.assert_allclose(again_positions, positions, atol=1e-5)
    # positions spread over an integer's slot decode to the same integers
    spread = layout.positions(static, cells, np.random.default_rng(0))
    assert not np.allclose(spread, positions)
    pd.testing.assert_frame_equal(layout.values(cells, spread)[["age"]], frame[["age"]])


def test_decoded_members_keep_their_recorded_cells(
    encoder: TabularEncoder, data: np.ndarray, static: pd.DataFrame, schema: CohortSchema
) -> None:
    """bmi values on a bin edge (23.0) would fall into the bin below through the float32 probits."""
    np.testing.assert_array_equal(to_cells(decoded_rows(encoder, data), schema), to_cells(static, schema))


def test_fallback_cells_follow_the_dp_marginals_and_label_shares(encoder: TabularEncoder) -> None:
    cells = independent_cells(encoder, 6000, np.random.default_rng(0), label_shares={"high": 0.5})
    label = encoder.schema.column_names.index("risk_level")
    assert np.mean(cells[:, label] == 2) == pytest.approx(0.5, abs=0.03)
    gender = encoder.schema.column_names.index("gender")
    shares = np.bincount(cells[:, gender], minlength=3) / len(cells)
    np.testing.assert_allclose(shares, encoder.marginal("gender"), atol=0.03)


# ---------------------------------------------------------------- sampling
class _ExactDenoiser(torch.nn.Module):
    """The exact eps-prediction for latents z_0 ~ N(0, I): E[eps | z_t] = sqrt(1 - alpha_bar_t) z_t."""

    def __init__(self, alpha_bars: torch.Tensor):
        super().__init__()
        self.alpha_bars = alpha_bars

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha_bars[t])[:, None].sqrt() * z


def test_ddpm_sampling_with_the_exact_denoiser_gives_the_target_latents() -> None:
    """The schedule and the sampler on their own (40 cosine steps: the last ones are steep)."""
    alpha_bars = cosine_alpha_bars(40)
    z = ddpm_sample(
        _ExactDenoiser(alpha_bars), torch.zeros(20_000, 3), 4, alpha_bars, torch.Generator().manual_seed(0)
    )
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=0.03)
    np.testing.assert_allclose(z.std(0).numpy(), 1.0, atol=0.03)


def test_values_stay_in_the_cells_the_coarse_model_drew(trained: HybridGenerator, coarse: PrivatePGM) -> None:
    model = _copy(trained)
    model.attach_coarse(coarse)
    drawn = model.sample(300, seed=3)
    np.testing.assert_array_equal(
        to_cells(drawn, model.encoder.schema), to_cells(coarse.sample(300, seed=3), model.encoder.schema)
    )
    by_label = model.sample(400, seed=4, label_shares={"high": 0.6})
    assert (by_label["risk_level"] == "high").mean() == pytest.approx(0.6, abs=0.08)


@pytest.mark.parametrize("mode", ["vae", "diffusion", "full"])
def test_every_ablation_samples_in_schema_types(
    mode: str, trained: HybridGenerator, schema: CohortSchema
) -> None:
    model = _copy(trained, sample_with=mode)
    frame = model.sample(120, seed=1)
    pd.testing.assert_frame_equal(model.sample(120, seed=1), frame)
    for spec in schema.columns:
        if not spec.is_categorical:
            assert frame[spec.name].between(spec.min, spec.max).all(), spec.name
            assert frame[spec.name].dtype == (np.int64 if spec.kind == "integer" else np.float64)
    cells = model.coarse_cells(120, seed=1)
    others = [m for m in ("vae", "diffusion", "full") if m != mode]
    for other in others:  # same cells, other within-bin positions
        assert not np.allclose(
            model.sample_positions(cells, seed=1), model.sample_positions(cells, seed=1, sample_with=other)
        )


# ---------------------------------------------------------------- training and privacy
@pytest.mark.parametrize("phase", PHASES)
def test_each_phase_is_one_dp_charge_and_trains_only_its_networks(
    phase: str, trained: HybridGenerator, data: np.ndarray
) -> None:
    model = _copy(trained)
    before = model.state_dict()
    ledger = PrivacyLedger(max_epsilon=50.0, delta=1e-5)
    steps = steps_per_epoch(N_ROWS, BATCH)
    plan = LocalRound(epochs=1, batch_size=BATCH, dp=_dp(ledger), device=CPU, seed=2, phase=phase)
    report = model.fit_round(LocalData(profiles=data), plan)
    assert report.steps == steps
    assert [(e.mechanism, e.steps) for e in ledger.entries] == [("dp-sgd", steps)]
    assert phase in ledger.entries[0].what
    assert ledger.spent() == pytest.approx(
        PrivacyLedger(max_epsilon=50.0, delta=1e-5).epsilon_if(
            noise_multiplier=1.0, sample_rate=1 / steps, steps=steps
        )
    )
    after = model.state_dict()
    changed = {k.partition(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == TRAINED_IN[phase]


def test_fake_rows_take_the_stand_ins_cells_never_a_members(
    trained: HybridGenerator, data: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _copy(trained)
    stand_in = model.encoder.transform(generate_demo_cohort(1, seed=99).static)
    seen: list[np.ndarray] = []
    real_fake_cells = model.fake_cells

    def recording(n: int, rng: np.random.Generator, pool: np.ndarray | None) -> np.ndarray:
        cells = real_fake_cells(n, rng, pool)
        seen.append(cells)
        return cells

    monkeypatch.setattr(model, "fake_cells", recording)
    ledger = PrivacyLedger(max_epsilon=50.0, delta=1e-5)
    stand_ins = np.repeat(stand_in, 3, axis=0)
    model.fit(
        data,
        epochs=1,
        batch_size=BATCH,
        dp=_dp(ledger),
        device=CPU,
        seed=1,
        phase="refine",
        stand_ins=stand_ins,
    )
    expected = model.stand_in_cells(stand_in)
    assert seen and sum(len(c) for c in seen) > N_ROWS  # D's fakes and the refiner's
    assert all((cells == expected).all() for cells in seen)


def test_unknown_phase_and_foreign_coarse_state_are_refused(
    trained: HybridGenerator, data: np.ndarray, coarse: PrivatePGM
) -> None:
    with pytest.raises(ValueError, match="phase"):
        trained.fit(data, epochs=1, batch_size=BATCH, dp=None, device=CPU, seed=0, phase="joint")
    with_coarse = _copy(trained)
    with_coarse.attach_coarse(coarse)
    with pytest.raises(KeyError, match="coarse"):
        _copy(trained).load_state_dict(with_coarse.state_dict())


def test_bundle_with_a_coarse_model_rebuilds_it(
    trained: HybridGenerator, coarse: PrivatePGM, tmp_path: Path
) -> None:
    model = _copy(trained)
    model.attach_coarse(coarse)
    assert model.config.coarse_model == "pgm"
    sampler = model.sampler_state_dict()
    assert "coarse.total" in sampler and not any(k.startswith("discriminator.") for k in sampler)
    rebuilt = HybridGenerator(model.encoder, model.config.model_dump(mode="json"), seed=9)
    rebuilt.load_state_dict(model.state_dict())
    pd.testing.assert_frame_equal(rebuilt.sample(80, seed=2), model.sample(80, seed=2))
    save_bundle(tmp_path / "bundle", model=model, card={"name": "hhg-test"})
    loaded, card = load_bundle(tmp_path / "bundle")
    assert card["model_params"]["coarse_model"] == "pgm"
    pd.testing.assert_frame_equal(loaded.sample(80, seed=2), model.sample(80, seed=2))


def test_a_dp_training_step_runs_with_bf16_forward_passes(
    trained: HybridGenerator, data: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path CUDA takes (`models.runtime.autocast_for`: bf16 forward, fp32 step), on CPU."""
    import models.hhg.networks
    import models.hhg.training

    monkeypatch.setattr(models.hhg.training, "autocast_for", bf16_on_cpu)
    monkeypatch.setattr(models.hhg.networks, "autocast_for", bf16_on_cpu)
    model = _copy(trained)
    before = model.state_dict()
    ledger = PrivacyLedger(max_epsilon=50.0, delta=1e-5)
    report = model.fit(data, epochs=1, batch_size=BATCH, dp=_dp(ledger), device=CPU, seed=0)
    after = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # master weights stay fp32
    assert {k.partition(".")[0] for k in after if not torch.equal(after[k], before[k])} == set(
        model._NETWORKS
    )
    assert np.isfinite(report.discriminator_loss_sum) and ledger.spent() > 0
