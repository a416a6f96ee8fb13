"""Tests for models.pairs: mergeable pair tables on public cells and SDMetrics-style pair trends."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from configs.schema import ColumnSpec, load_schema
from models.pairs import (
    PAIR_MAX_BINS,
    association_differences,
    axis_cells,
    cell_codes,
    column_pairs,
    contingency_similarity,
    correlation_from_pairs,
    correlation_similarity,
    cramers_v,
    merge_pair_counts,
    pair_counts,
    pair_counts_problem,
    pair_edges,
    pair_key,
    pair_sensitivity,
    pair_shape,
    pair_trend_scores,
)
from models.statistics import column_counts, mean_score
from simulation.cohort import generate_demo_cohort

SCHEMA = load_schema()


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    return generate_demo_cohort(3000, seed=0).static


@pytest.fixture(scope="module")
def other_real() -> pd.DataFrame:
    """An independent sample of the same population (different seed)."""
    return generate_demo_cohort(3000, seed=1).static


@pytest.fixture(scope="module")
def shuffled(real: pd.DataFrame) -> pd.DataFrame:
    """Every column permuted on its own: same marginals, no pair structure left."""
    rng = np.random.default_rng(7)
    out = real.copy()
    for name in SCHEMA.column_names:
        out[name] = rng.permutation(out[name].to_numpy())
    return out


# ---------------------------------------------------------------- cells and counts
def test_demo_schema_has_36_pairs_with_public_shapes(real: pd.DataFrame) -> None:
    tables = pair_counts(real, SCHEMA)
    assert len(column_pairs(SCHEMA)) == 36 and len(tables) == 36
    for spec_a, spec_b in column_pairs(SCHEMA):
        table = tables[pair_key(spec_a.name, spec_b.name)]
        assert table.shape == pair_shape(spec_a, spec_b)
        assert max(table.shape) <= PAIR_MAX_BINS
        assert table.sum() == len(real)  # every demo row has a cell on both axes
    assert pair_counts_problem(tables, SCHEMA) is None


def test_pair_edges_are_a_subset_of_the_public_edges() -> None:
    for spec in SCHEMA.columns:
        if spec.is_categorical:
            continue
        edges = pair_edges(spec)
        assert np.isin(edges, spec.bin_edges()).all()
        assert edges[0] == spec.bin_edges()[0] and edges[-1] == spec.bin_edges()[-1]
        assert 1 <= len(edges) - 1 <= PAIR_MAX_BINS
        assert np.array_equal(pair_edges(spec, max_bins=1000), spec.bin_edges())


def test_table_margins_equal_the_one_dimensional_histograms(real: pd.DataFrame) -> None:
    """A pair table summed over one axis is the column's 1-D histogram on the (coarsened) cells."""
    tables = pair_counts(real, SCHEMA)
    for spec_a, spec_b in column_pairs(SCHEMA):
        table = tables[pair_key(spec_a.name, spec_b.name)]
        for spec, margin in ((spec_a, table.sum(axis=1)), (spec_b, table.sum(axis=0))):
            fine = column_counts(real[spec.name], spec)
            if spec.is_categorical:
                expected = fine
            else:
                kept = np.flatnonzero(np.isin(spec.bin_edges(), pair_edges(spec)))
                expected = np.add.reduceat(fine, kept[:-1])
            np.testing.assert_array_equal(margin, expected)


def test_one_patient_moves_each_table_by_one_cell(real: pd.DataFrame) -> None:
    """Neighbouring data sets differ by 1 in one cell per table: L2 sensitivity sqrt(pairs)."""
    full = pair_counts(real, SCHEMA)
    without = pair_counts(real.iloc[1:], SCHEMA)
    squared = 0.0
    for key in full:
        diff = full[key] - without[key]
        assert np.count_nonzero(diff) == 1 and diff.sum() == 1
        squared += float((diff**2).sum())
    assert math.sqrt(squared) == pytest.approx(pair_sensitivity(SCHEMA)) == pytest.approx(6.0)


def test_merge_adds_hospitals_up_and_clips_negatives(real: pd.DataFrame) -> None:
    parts = [pair_counts(real.iloc[i::3], SCHEMA) for i in range(3)]
    merged = merge_pair_counts(parts)
    whole = pair_counts(real, SCHEMA)
    for key in whole:
        np.testing.assert_array_equal(merged[key], whole[key])
    noisy = {key: table - 5.0 for key, table in parts[0].items()}
    assert all((t >= 0).all() for t in merge_pair_counts([noisy]).values())


def test_release_through_the_dp_facade_keeps_the_form(real: pd.DataFrame) -> None:
    """The pair dict goes through the same Gaussian release as the 1-D histograms."""
    from privacy.facade import release_noisy_histograms
    from privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(max_epsilon=4.0, delta=1e-5)
    tables = pair_counts(real, SCHEMA)
    noisy = release_noisy_histograms(tables, ledger=ledger, epsilon=1.0, rng=np.random.default_rng(0))
    assert {k: v.shape for k, v in noisy.items()} == {k: v.shape for k, v in tables.items()}
    assert pair_counts_problem(noisy, SCHEMA) is None
    assert 0 < ledger.spent() <= 1.0 + 1e-6


def test_cells_clip_out_of_range_numbers_and_drop_unknown_categories() -> None:
    age = SCHEMA.column("age")
    codes = cell_codes(pd.Series([-5, 18, 90, 500, np.nan]), age)
    assert codes.tolist() == [0, 0, axis_cells(age) - 1, axis_cells(age) - 1, -1]
    gender = SCHEMA.column("gender")
    assert cell_codes(pd.Series(["male", "robot", None]), gender).tolist() == [1, -1, -1]


def test_problem_names_missing_and_malformed_tables(real: pd.DataFrame) -> None:
    tables = pair_counts(real, SCHEMA)
    missing = dict(tables)
    del missing["age|gender"]
    assert "age|gender" in (pair_counts_problem(missing, SCHEMA) or "")
    bad = {**tables, "age|gender": np.zeros((2, 2))}
    assert "malformed" in (pair_counts_problem(bad, SCHEMA) or "")
    nan = {**tables, "age|bmi": np.full(tables["age|bmi"].shape, np.nan)}
    assert "age|bmi" in (pair_counts_problem(nan, SCHEMA) or "")


# ---------------------------------------------------------------- associations
def test_pearson_from_the_binned_table_tracks_the_raw_correlation(real: pd.DataFrame) -> None:
    tables = pair_counts(real, SCHEMA)
    a, b = SCHEMA.column("dass_depression"), SCHEMA.column("dass_stress")
    binned = correlation_from_pairs(tables["dass_depression|dass_stress"], a, b)
    raw = float(np.corrcoef(real["dass_depression"], real["dass_stress"])[0, 1])
    assert raw > 0.5
    assert binned == pytest.approx(raw, abs=0.05)


def test_cramers_v_extremes() -> None:
    assert cramers_v(np.eye(3) * 50) == pytest.approx(1.0)
    assert cramers_v(np.full((3, 4), 25.0)) == pytest.approx(0.0)
    assert cramers_v(np.zeros((3, 3))) == 0.0
    assert cramers_v(np.array([[10.0, 5.0]])) == 0.0  # one row: no association measurable


def test_degenerate_numeric_tables_give_zero_not_nan() -> None:
    a = ColumnSpec(name="a", kind="continuous", min=0, max=1, bins=4)
    b = ColumnSpec(name="b", kind="continuous", min=0, max=1, bins=4)
    one_row = np.zeros((4, 4))
    one_row[2] = [1, 2, 3, 4]
    assert correlation_from_pairs(one_row, a, b) == 0.0
    assert correlation_from_pairs(np.zeros((4, 4)), a, b) == 0.0
    assert correlation_from_pairs(np.diag([5.0, 5, 5, 5]), a, b) == pytest.approx(1.0)
    assert correlation_from_pairs(np.fliplr(np.diag([5.0, 5, 5, 5])), a, b) == pytest.approx(-1.0)


def test_similarities_follow_sdmetrics_definitions() -> None:
    assert correlation_similarity(0.6, 0.6) == 1.0
    assert correlation_similarity(1.0, -1.0) == 0.0
    assert correlation_similarity(0.2, 0.0) == pytest.approx(0.9)
    p = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert contingency_similarity(p, p * 7) == pytest.approx(1.0)
    assert contingency_similarity(p, np.array([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(0.0)


# ---------------------------------------------------------------- pair trends
def test_pair_trends_of_real_data_against_itself_are_one(real: pd.DataFrame) -> None:
    scores = pair_trend_scores(real, pair_counts(real, SCHEMA), SCHEMA)
    assert len(scores) == 36
    assert all(s == pytest.approx(1.0) for s in scores.values())


def test_pair_trends_separate_real_from_column_shuffled(
    real: pd.DataFrame, other_real: pd.DataFrame, shuffled: pd.DataFrame
) -> None:
    reference = pair_counts(real, SCHEMA)
    same_population = pair_trend_scores(other_real, reference, SCHEMA)
    broken = pair_trend_scores(shuffled, reference, SCHEMA)
    assert mean_score(same_population) > 0.95
    assert mean_score(broken) < mean_score(same_population) - 0.07
    # The strongly linked pairs lose most: DASS subscales and the risk label derived from them.
    for key in ("dass_depression|dass_stress", "dass_anxiety|risk_level", "age|occupation"):
        assert broken[key] < 0.8 < same_population[key]
    diffs = association_differences(shuffled, reference, SCHEMA)
    assert diffs["dass_depression|dass_stress"] < -0.5
    assert abs(association_differences(other_real, reference, SCHEMA)["dass_depression|dass_stress"]) < 0.05


def test_pair_trends_reject_a_mismatched_reference(real: pd.DataFrame) -> None:
    reference = pair_counts(real, SCHEMA)
    with pytest.raises(ValueError, match="missing"):
        pair_trend_scores(real, {k: v for k, v in reference.items() if k != "age|bmi"}, SCHEMA)
    with pytest.raises(ValueError, match="shape"):
        pair_trend_scores(real, {**reference, "age|bmi": np.ones((3, 3))}, SCHEMA)
    with pytest.raises(ValueError, match="lacks columns"):
        pair_counts(real.drop(columns=["bmi"]), SCHEMA)
