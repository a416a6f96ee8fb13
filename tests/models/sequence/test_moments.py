"""Tests for models.sequence.moments: exact and DP-released weekly moments, sensitivities, merging."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.sequence.moments import (
    MOMENT_BLOCKS,
    SequenceMoments,
    _clip_norms,
    moments_sensitivity,
    release_noisy_moments,
    second_moment_rows,
)
from privacy.ledger import BudgetExceededError, PrivacyLedger
from tests.models.sequence.support import DELTA, N

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

DAY_SD = np.full(5, 0.05)
WEEK_SD = np.full(5, 0.1)


def test_noisy_moments_release_is_charged_for_every_block(weeks: np.ndarray) -> None:
    ledger = PrivacyLedger(max_epsilon=50.0, delta=DELTA)
    rng = np.random.default_rng(0)
    released = release_noisy_moments(
        weeks, ledger=ledger, noise_multiplier=5.0, rng=rng, what="moments", day_sd=DAY_SD, week_sd=WEEK_SD
    )
    assert [(e.what, e.mechanism, e.noise_multiplier) for e in ledger.entries] == [
        (f"moments ({block})", "gaussian", 5.0) for block in MOMENT_BLOCKS
    ]
    reference = PrivacyLedger(max_epsilon=50.0, delta=DELTA, history=[(5.0, 1.0, len(MOMENT_BLOCKS))])
    assert ledger.spent() == pytest.approx(reference.spent(), rel=1e-9)
    mean, std = released.mean_std()
    assert mean.shape == std.shape == (7, 5)
    assert (mean >= 0).all() and (mean <= 1).all() and (std >= 0).all() and (std <= 0.5).all()
    rhythm = released.rhythm()
    assert all(np.isfinite(v).all() for v in rhythm.values())
    assert (rhythm["between_sd"] > 0).all() and (rhythm["within_sd"] > 0).all()
    for key in ("between_cov", "within_cov"):  # noisy, yet a covariance: symmetric, PSD
        cov = rhythm[key]
        np.testing.assert_allclose(cov, cov.T, atol=1e-7)
        assert np.linalg.eigvalsh(cov.astype(np.float64)).min() > -1e-6


def test_release_refused_over_budget_charges_nothing(weeks: np.ndarray) -> None:
    ledger = PrivacyLedger(max_epsilon=1.0, delta=DELTA)
    # Three blocks at this multiplier fit in epsilon 1, all four do not: nothing may be charged.
    z = 8.0
    assert ledger.epsilon_if(noise_multiplier=z, sample_rate=1.0, steps=3) < 1.0
    assert ledger.epsilon_if(noise_multiplier=z, sample_rate=1.0, steps=4) > 1.0
    with pytest.raises(BudgetExceededError):
        release_noisy_moments(
            weeks,
            ledger=ledger,
            noise_multiplier=z,
            rng=np.random.default_rng(0),
            what="m",
            day_sd=DAY_SD,
            week_sd=WEEK_SD,
        )
    assert ledger.entries == [] and ledger.spent() == 0.0


def _worst_cases(shape: tuple[int, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """One record each: spiky, flat, alternating, and random directions."""
    spiky = np.zeros((1, *shape))
    spiky.flat[0] = 1.0
    cases = [spiky, np.ones((1, *shape)), *rng.normal(size=(200, 1, *shape))]
    if len(shape) == 2:
        cases.append(np.tile(np.array([1.0, -1.0] * 4)[: shape[0], None], (1, 1, shape[1])))
    return cases


def test_second_moment_blocks_stay_within_their_sensitivity() -> None:
    """Weeks at the clip norms the release applies (worst-case directions): each week's own entry
    in blocks 3-6, as the release computes it, never exceeds `moments_sensitivity`."""
    length, channels = 7, 5
    sensitivity = moments_sensitivity(length, channels)
    tau = _clip_norms(length, channels)
    rng = np.random.default_rng(0)
    levels = [m.reshape(channels) for m in _worst_cases((channels,), rng)[:30]]
    deviations = [e.reshape(length, channels) for e in _worst_cases((length, channels), rng)]
    m = np.array([m * tau["between weeks"] / np.linalg.norm(m) for m in levels for _ in deviations])
    e = np.array([e * tau["within weeks"] / np.linalg.norm(e) for _ in levels for e in deviations])
    rows = second_moment_rows(m, e)
    assert set(rows) == set(MOMENT_BLOCKS[2:])
    for name, block in rows.items():
        norms = np.linalg.norm(block.reshape(len(block), -1), axis=1)
        assert norms.max() <= sensitivity[name] + 1e-9, name
        assert norms.max() > 0.5 * sensitivity[name], name  # the bound is not vacuous


def _correlated_weeks(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weeks with known between and within covariances (channel 1 varies 10x less than the rest)."""
    scale = np.array([0.03, 0.003, 0.03, 0.03, 0.03])
    mix = np.eye(5) + 0.5 * np.eye(5, k=1)  # neighbouring channels move together
    within = (mix @ mix.T) * np.outer(scale, scale)
    between = 4 * within
    person = rng.multivariate_normal(np.zeros(5), between, n)[:, None, :]
    days = rng.multivariate_normal(np.zeros(5), within, (n, 7))
    return np.clip(0.4 + person + days, 0.0, 1.0), between, within


def test_release_recovers_the_rhythm_of_many_weeks() -> None:
    """With many weeks and mild noise the blocks give back the exact means and covariances."""
    rng = np.random.default_rng(1)
    weeks, between, within = _correlated_weeks(20000, rng)
    ledger = PrivacyLedger(max_epsilon=1e3, delta=DELTA)
    day_sd, week_sd = np.sqrt(np.diag(within)), np.sqrt(np.diag(between))
    released = release_noisy_moments(
        weeks, ledger=ledger, noise_multiplier=2.0, rng=rng, what="m", day_sd=day_sd, week_sd=week_sd
    )
    exact, noisy = SequenceMoments.of(weeks, day_sd=day_sd).rhythm(), released.rhythm()
    np.testing.assert_allclose(noisy["mean"], exact["mean"], atol=0.005)
    for key in ("sd", "between_sd", "within_sd"):
        np.testing.assert_allclose(noisy[key], exact[key], rtol=0.1, err_msg=key)
    np.testing.assert_allclose(exact["within_cov"], within * 6 / 7, rtol=0.05, atol=2e-5)
    # Independent days of unit variance in day_sd units: deviations from the week's mean have
    # variance 6/7 and covary -1/7 across days. Clipping at about that spread shrinks the
    # release a little (-6%), evenly, so its shape stays.
    independent_days = np.eye(7) - 1 / 7
    np.testing.assert_allclose(exact["day_by_day"], independent_days, atol=0.02)
    np.testing.assert_allclose(np.diag(noisy["day_by_day"]), 6 / 7, rtol=0.1)
    shape = noisy["day_by_day"] / np.diag(noisy["day_by_day"]).mean()
    np.testing.assert_allclose(shape, independent_days * 7 / 6, atol=0.02)
    # Levels and days drawn independently: no covariance between a level and any day's deviation.
    unit = np.sqrt(np.diag(exact["between_cov"]) * np.diag(exact["within_cov"]))
    assert np.abs(exact["level_by_day"] / unit).max() < 0.03
    assert np.abs(noisy["level_by_day"] / unit).max() < 0.1
    # In each channel's own units the narrow channel 1 is as accurate as the rest.
    for key in ("between_cov", "within_cov"):
        sd = np.sqrt(np.diag(exact[key]))
        corr_gap = (noisy[key] - exact[key]) / np.outer(sd, sd)
        assert np.abs(corr_gap).max() < 0.1, key


@pytest.mark.parametrize("unit", ["day_sd", "week_sd"])
def test_declared_units_keep_a_narrow_channel_accurate(unit: str) -> None:
    """The reason for `day_sd` and `week_sd`: measured in its own units, a channel that varies 10x
    less than the others gets its within-week (between-people) spread with the same relative
    error; on one common scale it is buried in noise sized for the wide channels."""
    rng = np.random.default_rng(2)
    weeks, between, within = _correlated_weeks(1000, rng)
    key = {"day_sd": "within_sd", "week_sd": "between_sd"}[unit]
    exact = SequenceMoments.of(weeks).rhythm()[key][1]
    declared = {"day_sd": np.sqrt(np.diag(within)), "week_sd": np.sqrt(np.diag(between))}
    common = {"day_sd": np.full(5, 0.03), "week_sd": np.full(5, 0.06)}
    errors: dict[str, list[float]] = {"declared": [], "common": []}
    for trial in range(20):
        for name, scale in (("declared", declared[unit]), ("common", common[unit])):
            ledger = PrivacyLedger(max_epsilon=1e3, delta=DELTA)
            released = release_noisy_moments(
                weeks,
                ledger=ledger,
                noise_multiplier=10.0,
                rng=np.random.default_rng(trial),
                what="m",
                **{**declared, unit: scale},
            )
            errors[name].append(abs(released.rhythm()[key][1] / exact - 1))
    # one weekly mean per person against seven days: the between spread has the wider error bar
    bar = {"day_sd": 0.1, "week_sd": 0.2}[unit]
    assert np.mean(errors["declared"]) < bar < np.mean(errors["common"]), errors


def test_moment_problems_are_named(weeks: np.ndarray) -> None:
    moments = SequenceMoments.of(weeks, day_sd=DAY_SD)
    assert moments.problem(7, DAY_SD) is None
    assert moments.problem(8, DAY_SD) == "sequence moments' sums has shape (7, 5), expected (8, 5)"
    wrong_days = dataclasses.replace(moments, day_by_day=np.zeros((8, 8)))
    assert "day_by_day has shape (8, 8), expected (7, 7)" in str(wrong_days.problem(7, DAY_SD))
    broken = dataclasses.replace(moments, lag1=np.full(5, np.nan))
    assert broken.problem(7, DAY_SD) == "sequence moments' lag1 is not finite"
    assert "day_sd units" in str(moments.problem(7, 2 * DAY_SD))
    with pytest.raises(ValueError, match="different day_sd units"):
        moments.merged(SequenceMoments.of(weeks))


def test_moments_merge_by_adding(weeks: np.ndarray) -> None:
    half = len(weeks) // 2
    merged = SequenceMoments.of(weeks[:half]).merged(SequenceMoments.of(weeks[half:]))
    whole = SequenceMoments.of(weeks)
    assert merged.count == whole.count == N
    for name in ("sums", "squares", "week_products"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-9)
    round_trip = SequenceMoments.from_json(merged.to_json())
    for name in SequenceMoments._FIELDS:
        np.testing.assert_allclose(getattr(round_trip, name), getattr(merged, name), err_msg=name)
    assert round_trip.count == merged.count


def test_moments_from_an_older_format_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"lack \['week_products', 'day_by_day', 'level_by_day', 'day_sd'\]"):
        SequenceMoments.from_json(
            '{"sums": [], "squares": [], "count": 1, "within": [], "lag1": [], "week_squares": []}'
        )
