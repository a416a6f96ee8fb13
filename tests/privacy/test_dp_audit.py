"""The DP audit's histograms and the figures the server derives from them."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from privacy.dp_audit import (
    AUDIT_ATTACKS,
    attack_figures,
    attack_scores,
    audit_histograms,
    binned_auc,
    dcr_protection,
    sample_bandwidth,
)


def _population(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6))


def test_a_copying_generator_fails_and_an_independent_one_does_not() -> None:
    members, holdout = _population(800, 1), _population(200, 2)
    independent, reference = _population(800, 3), _population(800, 4)
    copying = members + np.random.default_rng(5).normal(scale=1e-3, size=members.shape)
    for synthetic, leaky in ((copying, True), (independent, False)):
        counts, _ = audit_histograms(members, holdout, synthetic, reference)
        parts = [(counts["distance"], 0.0)]
        figures = attack_figures(parts, n_bootstrap=50, seed=0)
        dcr = dcr_protection(figures, parts)
        if leaky:
            assert figures.auc > 0.9 and figures.tpr_at_1pct_fpr > 0.5 and dcr["score"] < 0.3
        else:
            assert abs(figures.auc - 0.5) < 0.08 and figures.tpr_at_1pct_fpr < 0.1 and dcr["score"] > 0.85


def test_counts_cover_every_patient_once_per_attack() -> None:
    members, holdout = _population(300, 1), _population(70, 2)
    counts, edges = audit_histograms(members, holdout, _population(400, 3), _population(400, 4))
    assert set(counts) == set(AUDIT_ATTACKS)
    for name in AUDIT_ATTACKS:
        assert counts[name].shape == (2, len(edges[name]) + 1)
        assert counts[name][0].sum() == 300 and counts[name][1].sum() == 70


def test_binned_auc_equals_the_exact_auc_when_every_score_has_its_own_bin() -> None:
    rng = np.random.default_rng(0)
    member_scores, holdout_scores = rng.normal(0.3, 1, 200), rng.normal(0, 1, 150)
    edges = np.sort(np.r_[member_scores, holdout_scores])[:-1] + 1e-9
    m = np.bincount(np.searchsorted(edges, member_scores, side="right"), minlength=len(edges) + 1)
    h = np.bincount(np.searchsorted(edges, holdout_scores, side="right"), minlength=len(edges) + 1)
    exact = roc_auc_score(np.r_[np.ones(200), np.zeros(150)], np.r_[member_scores, holdout_scores])
    assert binned_auc(m.astype(float), h.astype(float)) == pytest.approx(exact, abs=1e-9)


def test_the_interval_widens_with_the_release_noise() -> None:
    counts = np.array([[40.0, 60, 80, 20], [10, 15, 20, 5]])
    quiet = attack_figures([(counts, 0.0)], n_bootstrap=200, seed=1)
    noisy = attack_figures([(counts, 8.0)], n_bootstrap=200, seed=1)
    assert quiet.auc == noisy.auc
    assert noisy.auc_ci_high - noisy.auc_ci_low > quiet.auc_ci_high - quiet.auc_ci_low


def test_scores_use_the_synthetic_sample_only() -> None:
    synthetic = _population(100, 3)
    real = _population(10, 1)
    bandwidth = sample_bandwidth(synthetic)
    alone = attack_scores(real[:1], synthetic, bandwidth=bandwidth)
    together = attack_scores(real, synthetic, bandwidth=bandwidth)
    # a patient's score does not depend on who else is scored: sensitivity is one count
    for name in AUDIT_ATTACKS:
        assert alone[name][0] == pytest.approx(together[name][0])


def test_pooling_averages_hospitals_by_their_held_out_counts() -> None:
    a = np.array([[10.0, 10, 80], [30, 30, 40]])  # a leaky-looking hospital
    b = np.array([[50.0, 50, 50], [150, 150, 150]])  # chance, three times the held-out patients
    pooled = attack_figures([(a, 0.0), (b, 0.0)], n_bootstrap=20, seed=0)
    expected = (100 * binned_auc(a[0], a[1]) + 450 * binned_auc(b[0], b[1])) / 550
    assert pooled.auc == pytest.approx(expected)
    assert pooled.n_members == 250 and pooled.n_nonmembers == 550


def test_the_monotone_fit_is_sklearns_isotonic_regression() -> None:
    from sklearn.isotonic import IsotonicRegression

    from privacy.dp_audit import _non_decreasing

    rng = np.random.default_rng(4)
    for _ in range(20):
        values = np.cumsum(rng.normal(0.05, 0.2, 13))
        reference = IsotonicRegression().fit_transform(np.arange(values.size), values)
        assert np.allclose(_non_decreasing(values), reference)


def test_noise_does_not_pull_a_small_hospitals_auc_towards_no_leak() -> None:
    """Clipping each noisy bin at 0 inflates near-empty bins, most for the smaller group (the held-out
    patients), which drew the AUC of a chance-level attack down to 0.46 at 50 held-out patients;
    the monotone fit of the cumulative counts keeps it at 0.5."""
    from privacy.dp_audit import EDGE_QUANTILES

    shares = np.diff(np.r_[0.0, EDGE_QUANTILES, 1.0])
    rng = np.random.default_rng(0)
    draws = [
        binned_auc(
            rng.multinomial(200, shares) + rng.normal(0, 4.5, shares.size),
            rng.multinomial(50, shares) + rng.normal(0, 4.5, shares.size),
        )
        for _ in range(2000)  # one draw's AUC has sd 0.13: the mean's is 0.003
    ]
    assert abs(np.mean(draws) - 0.5) < 0.015
