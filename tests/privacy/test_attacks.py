"""Tests for privacy.attacks: DCR protection and membership-inference attacks (aggregates only)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from privacy.attacks import (
    DCR_BIN_EDGES,
    FPR_GRID,
    NNDR_BIN_EDGES,
    AttackResult,
    DCRResult,
    classifier_attack,
    dcr_overfitting_protection,
    distance_attack,
    domias_attack,
    roc_auc_with_ci,
    run_membership_attacks,
    tpr_at_fpr,
)

N_NUMERIC, N_CATEGORIES = 30, 10  # 40 encoded features, like the real cohorts


def _population(rng: np.random.Generator, n: int) -> np.ndarray:
    """Standardised numeric columns plus one one-hot categorical, as the encoder emits."""
    numeric = rng.normal(size=(n, N_NUMERIC))
    one_hot = np.eye(N_CATEGORIES)[rng.integers(0, N_CATEGORIES, size=n)]
    return np.hstack([numeric, one_hot])


@pytest.fixture(scope="module")
def cohort() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240601)
    members = _population(rng, 300)
    return {
        "members": members,
        "nonmembers": _population(rng, 300),
        "reference": _population(rng, 300),
        # A generator that memorised its training set: members plus a whisper of noise.
        "copying": members + rng.normal(scale=0.01, size=members.shape),
        # An ideal generator: fresh draws from the population, independent of the members.
        "independent": _population(rng, 300),
    }


@pytest.fixture(scope="module")
def copying_attacks(cohort: dict[str, np.ndarray]) -> list[AttackResult]:
    c = cohort
    return run_membership_attacks(c["members"], c["nonmembers"], c["copying"], c["reference"], seed=7)


@pytest.fixture(scope="module")
def independent_attacks(cohort: dict[str, np.ndarray]) -> list[AttackResult]:
    c = cohort
    return run_membership_attacks(c["members"], c["nonmembers"], c["independent"], c["reference"], seed=7)


# ---------------------------------------------------------------------------- end to end
def test_memorising_generator_is_flagged(
    cohort: dict[str, np.ndarray], copying_attacks: list[AttackResult]
) -> None:
    dcr = dcr_overfitting_protection(cohort["members"], cohort["nonmembers"], cohort["copying"], seed=7)
    assert dcr.score < 0.5
    assert dcr.closer_to_training > 0.75
    assert dcr.median_dcr_training < 0.1 * dcr.median_dcr_holdout

    assert [a.name for a in copying_attacks] == ["distance", "domias", "classifier"]
    for attack in copying_attacks:
        assert attack.auc > 0.75, attack
        assert attack.tpr_at_1pct_fpr > 0.10, attack  # far above the 1% of a blind guess


def test_independent_generator_looks_safe(
    cohort: dict[str, np.ndarray], independent_attacks: list[AttackResult]
) -> None:
    dcr = dcr_overfitting_protection(cohort["members"], cohort["nonmembers"], cohort["independent"], seed=7)
    assert dcr.score >= 0.85
    for attack in independent_attacks:
        assert abs(attack.auc - 0.5) <= 0.1, attack
        assert attack.auc_ci_low <= 0.6, attack


def test_attack_cis_bracket_point_auc(
    copying_attacks: list[AttackResult], independent_attacks: list[AttackResult]
) -> None:
    for attack in [*copying_attacks, *independent_attacks]:
        assert 0.0 <= attack.auc_ci_low <= attack.auc <= attack.auc_ci_high <= 1.0, attack


def test_attacks_are_deterministic_for_a_seed(cohort: dict[str, np.ndarray]) -> None:
    c = cohort
    members, nonmembers = c["members"], c["nonmembers"][:250]  # unbalanced: exercises subsampling
    runs = [
        run_membership_attacks(members, nonmembers, c["copying"], c["reference"], seed=3) for _ in range(2)
    ]
    assert runs[0] == runs[1]
    dcrs = [dcr_overfitting_protection(members, nonmembers, c["copying"], seed=3) for _ in range(2)]
    assert dcrs[0] == dcrs[1]


def test_candidate_sets_are_balanced(cohort: dict[str, np.ndarray]) -> None:
    c = cohort
    result = distance_attack(c["members"][:120], c["nonmembers"], c["independent"], seed=1)
    assert result.n_members == result.n_nonmembers == 120
    dcr = dcr_overfitting_protection(c["members"], c["nonmembers"][:90], c["independent"], seed=1)
    assert dcr.n_training == dcr.n_holdout == 90
    assert dcr.n_synthetic == len(c["independent"])


# ---------------------------------------------------------------------------- aggregates only
def _assert_aggregate_only(result: object, forbidden_lengths: set[int]) -> None:
    assert dataclasses.is_dataclass(result)
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        assert not isinstance(value, np.ndarray | list), field.name
        if isinstance(value, tuple):
            assert len(value) not in forbidden_lengths, field.name
            assert all(isinstance(v, int | float) for v in value), field.name
        else:
            assert isinstance(value, str | int | float), field.name


def test_results_hold_no_per_record_arrays(cohort: dict[str, np.ndarray]) -> None:
    c = cohort
    # Distinct sizes so any leaked per-record vector would have a recognisable length.
    members, nonmembers = c["members"][:260], c["nonmembers"][:290]
    synthetic, reference = c["copying"][:270], c["reference"][:280]
    forbidden = {260, 290, 270, 280, 2 * 260}

    attacks = run_membership_attacks(members, nonmembers, synthetic, reference, seed=0)
    for attack in attacks:
        assert isinstance(attack, AttackResult)
        assert attack.n_members == attack.n_nonmembers == 260
        _assert_aggregate_only(attack, forbidden)
    dcr = dcr_overfitting_protection(members, nonmembers, synthetic, seed=0)
    assert isinstance(dcr, DCRResult)
    _assert_aggregate_only(dcr, forbidden)


def test_output_shapes_do_not_depend_on_n(cohort: dict[str, np.ndarray]) -> None:
    c = cohort
    for n in (40, 300):
        attack = distance_attack(c["members"][:n], c["nonmembers"][:n], c["independent"], seed=0)
        assert attack.roc_fpr == FPR_GRID
        assert len(attack.roc_tpr) == len(FPR_GRID)
        tpr = np.asarray(attack.roc_tpr)
        assert np.all((tpr >= 0) & (tpr <= 1)) and np.all(np.diff(tpr) >= 0)
        assert attack.roc_tpr[-1] == 1.0

        dcr = dcr_overfitting_protection(c["members"][:n], c["nonmembers"][:n], c["copying"], seed=0)
        assert dcr.dcr_bin_edges == DCR_BIN_EDGES and dcr.nndr_bin_edges == NNDR_BIN_EDGES
        assert len(dcr.dcr_training_counts) == len(dcr.dcr_holdout_counts) == len(DCR_BIN_EDGES) - 1
        assert len(dcr.nndr_counts) == len(NNDR_BIN_EDGES) - 1
        # Counts are mergeable: every synthetic row lands in exactly one bin.
        for counts in (dcr.dcr_training_counts, dcr.dcr_holdout_counts, dcr.nndr_counts):
            assert sum(counts) == dcr.n_synthetic


def test_fpr_grid_is_public_and_covers_low_fpr() -> None:
    grid = np.asarray(FPR_GRID)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and np.all(np.diff(grid) > 0)
    for target in (1e-4, 1e-3, 1e-2, 0.5):
        assert np.any(np.isclose(grid, target, rtol=0, atol=1e-12))


# ---------------------------------------------------------------------------- DCR by hand
def test_dcr_matches_hand_computation() -> None:
    training = np.array([[0.0], [10.0]])
    holdout = np.array([[5.0], [20.0]])
    # DCR to training / holdout: 1 vs 4 (training), 1 vs 4 (training), 2.5 vs 2.5 (tie -> holdout)
    synthetic = np.array([[1.0], [9.0], [7.5]])
    dcr = dcr_overfitting_protection(training, holdout, synthetic, seed=0)
    assert dcr.closer_to_training == pytest.approx(2 / 3)
    assert dcr.score == pytest.approx(2 / 3)  # min(1, 2 * (1 - 2/3))
    assert dcr.median_dcr_training == pytest.approx(1.0)
    assert dcr.median_dcr_holdout == pytest.approx(4.0)
    # NNDR: 1/9, 1/9, 2.5/7.5
    assert dcr.mean_nndr == pytest.approx((1 / 9 + 1 / 9 + 1 / 3) / 3)


# ---------------------------------------------------------------------------- ROC helpers
def test_tpr_at_fpr_hand_computed() -> None:
    # Ranked by score: M M N M N M N N -> ROC envelope (0, .5) (.25, .75) (.5, 1) (.75, 1) (1, 1)
    labels = [1, 1, 0, 1, 0, 1, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    assert tpr_at_fpr(labels, scores, 0.25) == pytest.approx(0.75)  # an achievable FPR
    assert tpr_at_fpr(labels, scores, 0.375) == pytest.approx(0.875)  # interpolated
    assert tpr_at_fpr(labels, scores, 0.5) == pytest.approx(1.0)
    # Below one false positive (1/4): the TPR with zero false positives, no interpolation.
    assert tpr_at_fpr(labels, scores, 0.1) == pytest.approx(0.5)
    assert tpr_at_fpr(labels, scores, 0.001) == pytest.approx(0.5)
    assert tpr_at_fpr(labels, scores, 0.0) == pytest.approx(0.5)


def test_tpr_at_fpr_with_tied_scores() -> None:
    # The tie at 0.5 (one member, one non-member) is a single diagonal ROC step.
    labels = [1, 1, 0, 0]
    scores = [0.9, 0.5, 0.5, 0.1]
    assert tpr_at_fpr(labels, scores, 0.4) == pytest.approx(0.5)
    assert tpr_at_fpr(labels, scores, 0.5) == pytest.approx(1.0)
    assert tpr_at_fpr(labels, scores, 0.75) == pytest.approx(1.0)


def test_roc_auc_with_ci_brackets_and_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(150), np.zeros(150)]
    for shift in (0.0, 0.5, 1.5):
        scores = rng.normal(size=300) + shift * labels
        scores = np.round(scores, 1)  # force ties: the rank form must treat them like sklearn
        auc, low, high = roc_auc_with_ci(labels, scores, n_bootstrap=200, seed=0)
        assert auc == pytest.approx(roc_auc_score(labels, scores))
        assert low <= auc <= high
        assert high - low < 0.25
    assert roc_auc_with_ci([1, 1, 0, 0], [4, 3, 2, 1], n_bootstrap=50, seed=0) == (1.0, 1.0, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.tuples(st.booleans(), st.integers(-5, 5)), min_size=2, max_size=40),
    targets=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=5),
)
def test_tpr_at_fpr_is_monotone_and_bounded(data: list[tuple[bool, int]], targets: list[float]) -> None:
    labels = [int(b) for b, _ in data]
    assume(len(set(labels)) == 2)
    scores = [s for _, s in data]
    values = [tpr_at_fpr(labels, scores, t) for t in sorted(targets)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert np.all(np.diff(values) >= -1e-12)


# ---------------------------------------------------------------------------- validation
def test_rejects_bad_inputs(cohort: dict[str, np.ndarray]) -> None:
    c = cohort
    with pytest.raises(ValueError, match="feature encoding"):
        distance_attack(c["members"], c["nonmembers"], c["independent"][:, :5], seed=0)
    bad = c["members"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dcr_overfitting_protection(bad, c["nonmembers"], c["independent"], seed=0)
    with pytest.raises(ValueError, match="both"):
        tpr_at_fpr([1, 1], [0.1, 0.2], 0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        domias_attack(c["members"], c["nonmembers"], c["independent"], c["reference"], seed=0, bandwidth=0.0)
    with pytest.raises(ValueError, match="seed"):
        classifier_attack(c["members"], c["nonmembers"], c["independent"], c["reference"], seed=-1)
