"""Tests for models.sequence_metrics: fidelity of synthetic weeks, checked on demo cohorts and garbage."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from configs.schema import load_schema
from models.sequence.encoder import SequenceEncoder
from models.sequence_metrics import (
    autocorrelation_difference,
    channel_ks_complement,
    discriminative_score,
    evaluate_sequences,
    link_fidelity,
    link_pairs,
    predictive_score,
)
from simulation.cohort import DEMO_LINK_PAIRS, generate_demo_cohort
from tests.support.other_cohort import other_schema

N = 600
Cohort = tuple[pd.DataFrame, np.ndarray]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def encoder() -> SequenceEncoder:
    return SequenceEncoder.from_schema(load_schema())


def _encoded(encoder: SequenceEncoder, seed: int) -> Cohort:
    cohort = generate_demo_cohort(N, seed=seed)
    # The static ids fix the row order, so week i belongs to static row i.
    return cohort.static, encoder.transform(cohort.timeseries, cohort.static["patient_id"])


@pytest.fixture(scope="module")
def real(encoder: SequenceEncoder) -> Cohort:
    return _encoded(encoder, 11)


@pytest.fixture(scope="module")
def other_real(encoder: SequenceEncoder) -> Cohort:
    """An independent draw of the same population: what a perfect generator would produce."""
    return _encoded(encoder, 12)


@pytest.fixture(scope="module")
def noise(real: Cohort) -> np.ndarray:
    return np.random.default_rng(0).random(real[1].shape).astype(np.float32)


@pytest.fixture(scope="module")
def moment_matched(other_real: Cohort) -> np.ndarray:
    """Right per-(day, channel) mean and std, but days and channels drawn independently."""
    weeks = other_real[1]
    rng = np.random.default_rng(1)
    return np.clip(rng.normal(weeks.mean(0), weeks.std(0), weeks.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def report(encoder: SequenceEncoder, real: Cohort, other_real: Cohort) -> dict[str, float]:
    return evaluate_sequences(
        real[1],
        other_real[1],
        channels=encoder.channels,
        seed=0,
        real_static=real[0],
        syn_static=other_real[0],
        pairs=DEMO_LINK_PAIRS,
    )


# ---------------------------------------------------------------- KS complement
def test_ks_complement_is_high_for_an_independent_real_sample(
    encoder: SequenceEncoder, real: Cohort, other_real: Cohort
) -> None:
    scores = channel_ks_complement(real[1], other_real[1], encoder.channels)
    assert list(scores) == encoder.channels
    assert np.mean(list(scores.values())) > 0.9
    assert min(scores.values()) > 0.85


def test_ks_complement_is_low_for_noise(encoder: SequenceEncoder, real: Cohort, noise: np.ndarray) -> None:
    scores = channel_ks_complement(real[1], noise, encoder.channels)
    assert np.mean(list(scores.values())) < 0.7


def test_ks_complement_of_identical_data_is_one(encoder: SequenceEncoder, real: Cohort) -> None:
    assert set(channel_ks_complement(real[1], real[1], encoder.channels).values()) == {1.0}


# ---------------------------------------------------------------- discriminative score
def test_discriminative_score_is_small_for_an_independent_real_sample(
    real: Cohort, other_real: Cohort
) -> None:
    result = discriminative_score(real[1], other_real[1], seed=0)
    assert result["score"] < 0.15
    # Balanced 80/20 split per class: 120 held-out weeks of each kind.
    assert result["n_test"] == 240.0
    assert result["accuracy"] == pytest.approx(result["n_test_correct"] / result["n_test"])
    assert result["score"] == pytest.approx(abs(result["accuracy"] - 0.5))


def test_discriminative_score_is_high_for_noise(real: Cohort, noise: np.ndarray) -> None:
    assert discriminative_score(real[1], noise, seed=0)["score"] > 0.3


def test_discriminative_score_catches_right_moments_wrong_dynamics(
    real: Cohort, moment_matched: np.ndarray
) -> None:
    # Marginals alone look fine to KS; the recurrent classifier must see the missing carry-over.
    assert discriminative_score(real[1], moment_matched, seed=0)["score"] > 0.2


def test_discriminative_score_balances_unequal_sizes(real: Cohort, other_real: Cohort) -> None:
    result = discriminative_score(real[1], other_real[1][:100], seed=0)
    assert result["n_test"] == 40.0


def test_discriminative_score_is_deterministic_and_leaves_the_global_rng_alone(
    real: Cohort, noise: np.ndarray
) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    first = discriminative_score(real[1], noise[:200], seed=5, epochs=3)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert discriminative_score(real[1], noise[:200], seed=5, epochs=3) == first


# ---------------------------------------------------------------- predictive score
def test_training_on_real_weeks_predicts_real_weeks_better_than_training_on_noise(
    real: Cohort, other_real: Cohort, noise: np.ndarray
) -> None:
    good = predictive_score(real[1], other_real[1], seed=0)
    bad = predictive_score(real[1], noise, seed=0)
    assert good["mae"] < 0.6 * bad["mae"]
    # One prediction per (patient, day 2..7, channel), and the sum merges across hospitals.
    assert good["n_values"] == float(N * 6 * 5)
    assert good["mae"] == pytest.approx(good["abs_error_sum"] / good["n_values"])


def test_predictive_score_is_deterministic(real: Cohort, other_real: Cohort) -> None:
    first = predictive_score(real[1], other_real[1][:200], seed=3, epochs=3)
    assert predictive_score(real[1], other_real[1][:200], seed=3, epochs=3) == first


# ---------------------------------------------------------------- autocorrelation
def test_autocorrelation_difference_of_real_vs_itself_is_zero(encoder: SequenceEncoder, real: Cohort) -> None:
    result = autocorrelation_difference(real[1], real[1], channels=encoder.channels)
    assert result["diff"] == 0.0
    assert list(result["per_channel"]) == encoder.channels
    for values in result["per_channel"].values():
        assert set(values) == {f"lag{k}/{side}" for k in (1, 2) for side in ("real", "synthetic", "diff")}
        assert values["lag1/diff"] == values["lag2/diff"] == 0.0
        # The demo's weeks carry over from day to day (patient profile + AR(1) noise).
        assert values["lag1/real"] > 0.3


def test_autocorrelation_difference_separates_real_from_independent_days(
    real: Cohort, other_real: Cohort, moment_matched: np.ndarray
) -> None:
    assert autocorrelation_difference(real[1], other_real[1])["diff"] < 0.05
    assert autocorrelation_difference(real[1], moment_matched)["diff"] > 0.3


def test_autocorrelation_rejects_lags_beyond_the_week(real: Cohort) -> None:
    with pytest.raises(ValueError, match="lags"):
        autocorrelation_difference(real[1], real[1], lags=(7,))


# ---------------------------------------------------------------- link fidelity
def test_links_agree_between_independent_real_samples(
    encoder: SequenceEncoder, real: Cohort, other_real: Cohort
) -> None:
    result = link_fidelity(*real, *other_real, pairs=DEMO_LINK_PAIRS, channels=encoder.channels)
    assert list(result["links"]) == [f"{c}~{ch}" for c, ch in DEMO_LINK_PAIRS]
    assert result["max_diff"] < 0.15
    # The demo cohort builds these links in: more depression, less sleep.
    assert result["links"]["dass_depression~sleep_hours"]["real"] < -0.4


def test_links_break_when_weeks_are_shuffled_across_patients(
    encoder: SequenceEncoder, real: Cohort, other_real: Cohort
) -> None:
    static, weeks = other_real
    shuffled = weeks[np.random.default_rng(2).permutation(len(weeks))]
    result = link_fidelity(*real, static, shuffled, pairs=DEMO_LINK_PAIRS, channels=encoder.channels)
    link = result["links"]["dass_depression~sleep_hours"]
    assert abs(link["synthetic"]) < 0.15
    assert link["diff"] > 0.4
    assert result["max_diff"] >= link["diff"]


def test_link_fidelity_checks_its_inputs(encoder: SequenceEncoder, real: Cohort) -> None:
    static, weeks = real
    with pytest.raises(ValueError, match="static rows"):
        link_fidelity(
            static, weeks, static.iloc[:10], weeks, pairs=DEMO_LINK_PAIRS, channels=encoder.channels
        )
    with pytest.raises(ValueError, match="unknown channel"):
        link_fidelity(static, weeks, static, weeks, pairs=[("age", "mood")], channels=encoder.channels)
    with pytest.raises(ValueError, match="not numeric"):
        link_fidelity(static, weeks, static, weeks, pairs=[("gender", "steps")], channels=encoder.channels)


# ---------------------------------------------------------------- everything at once
def test_evaluate_sequences_returns_flat_finite_floats(
    encoder: SequenceEncoder, report: dict[str, float]
) -> None:
    assert all(type(v) is float and math.isfinite(v) for v in report.values())
    for channel in encoder.channels:
        assert f"ks/{channel}" in report
        assert f"autocorr/{channel}/lag1/diff" in report
    for column, channel in DEMO_LINK_PAIRS:
        for side in ("real", "synthetic", "diff"):
            assert f"link/{column}~{channel}/{side}" in report
    for key in ("ks-mean", "discriminative", "predictive-mae", "autocorr-diff", "link-max-diff"):
        assert key in report
    assert report["ks-mean"] > 0.9
    assert report["discriminative"] < 0.15
    assert report["link-max-diff"] < 0.15
    # Counts that let a server merge hospitals.
    assert report["n-real"] == report["n-synthetic"] == float(N)
    assert report["discriminative-n-test"] == 240.0
    assert report["predictive-n-values"] == float(N * 6 * 5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_evaluate_sequences_fits_a_flower_metric_record(report: dict[str, float]) -> None:
    from flwr.app import MetricRecord

    assert dict(MetricRecord(report)) == report


def test_evaluate_sequences_is_deterministic_for_a_seed(
    encoder: SequenceEncoder, real: Cohort, other_real: Cohort
) -> None:
    def run(seed: int) -> dict[str, float]:
        return evaluate_sequences(
            real[1][:200],
            other_real[1][:200],
            channels=encoder.channels,
            seed=seed,
            real_static=real[0][:200],
            syn_static=other_real[0][:200],
            pairs=DEMO_LINK_PAIRS,
            discriminative_epochs=5,
            predictive_epochs=5,
        )

    first = run(4)
    assert run(4) == first
    # The seed drives the split and the weights: another seed trains other networks.
    assert run(5)["predictive-abs-error-sum"] != first["predictive-abs-error-sum"]


def test_evaluate_sequences_without_static_tables_skips_links(
    encoder: SequenceEncoder, real: Cohort, noise: np.ndarray
) -> None:
    report = evaluate_sequences(real[1][:200], noise[:200], channels=encoder.channels, seed=0)
    assert not any(key.startswith("link") for key in report)
    assert report["discriminative"] > 0.3
    with pytest.raises(ValueError, match="both static tables"):
        evaluate_sequences(real[1], noise, channels=encoder.channels, seed=0, real_static=real[0])
    # no pairs named after one cohort by default: static tables come with the pairs to score
    with pytest.raises(ValueError, match=r"link_pairs\(schema\)"):
        evaluate_sequences(
            real[1], noise, channels=encoder.channels, seed=0, real_static=real[0], syn_static=real[0]
        )


def test_link_pairs_are_every_numeric_column_with_every_channel_of_the_schema() -> None:
    demo = load_schema()
    assert demo.sequence is not None
    pairs = link_pairs(demo)
    numeric = ["age", "bmi", "dass_depression", "dass_anxiety", "dass_stress"]
    assert pairs == tuple((c, ch.name) for c in numeric for ch in demo.sequence.channels)
    assert set(DEMO_LINK_PAIRS) <= set(pairs)  # the links the demo builds in are among them
    other = other_schema()
    assert link_pairs(other) == tuple(
        (c, ch)
        for c in ("insomnia_index", "ferritin", "neck_cm")
        for ch in ("sleep_efficiency", "awakenings", "spo2_nadir")
    )
    assert link_pairs(other_schema(with_sequence=False)) == ()


def test_constant_channels_still_give_finite_values(encoder: SequenceEncoder, real: Cohort) -> None:
    static, weeks = real
    flat = weeks[:200].copy()
    flat[:, :, 0] = 0.5  # a synthetic sleep channel that never varies: correlations are undefined
    report = evaluate_sequences(
        weeks[:200],
        flat,
        channels=encoder.channels,
        seed=0,
        real_static=static[:200],
        syn_static=static[:200],
        pairs=DEMO_LINK_PAIRS,
        discriminative_epochs=5,
        predictive_epochs=5,
    )
    assert all(math.isfinite(v) for v in report.values())
    assert report["link/dass_depression~sleep_hours/synthetic"] == 0.0
    assert report["autocorr/sleep_hours/lag1/synthetic"] == 0.0


def test_inputs_are_checked(encoder: SequenceEncoder, real: Cohort) -> None:
    weeks = real[1]
    with pytest.raises(ValueError, match="differ"):
        channel_ks_complement(weeks, weeks[:, :6], encoder.channels)
    with pytest.raises(ValueError, match="NaN"):
        predictive_score(weeks, np.full_like(weeks, np.nan), seed=0)
    with pytest.raises(ValueError, match="channel names"):
        channel_ks_complement(weeks, weeks, encoder.channels[:2])
    with pytest.raises(ValueError, match="train and a test"):
        discriminative_score(weeks[:1], weeks[:1], seed=0)
