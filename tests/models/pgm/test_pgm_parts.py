"""Private-PGM's parts: public cells, noisy tables within their sensitivity, selection, estimation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from configs.schema import CohortSchema, load_schema
from models.pgm.domain import from_cells, to_cells
from models.pgm.marginals import (
    Measurement,
    clique_key,
    clique_shape,
    marginal_counts,
    marginals_problem,
    release_marginals,
)
from models.pgm.selection import association, label_cliques, spanning_tree, survey_weights
from privacy.ledger import BudgetExceededError, PrivacyLedger
from simulation.cohort import generate_demo_cohort


@pytest.fixture(scope="module")
def schema() -> CohortSchema:
    return load_schema()


@pytest.fixture(scope="module")
def static() -> pd.DataFrame:
    return generate_demo_cohort(600, seed=4).static


def test_cells_round_trip_and_values_stay_in_their_bin(schema: CohortSchema, static: pd.DataFrame) -> None:
    cells = to_cells(static, schema)
    back = from_cells(cells, schema, np.random.default_rng(0))
    assert (to_cells(back, schema) == cells).all()
    for spec in schema.columns:
        if spec.kind == "integer":
            assert back[spec.name].dtype == np.int64
        if not spec.is_categorical:
            assert back[spec.name].between(spec.min, spec.max).all()


def test_tables_keep_every_record_and_coarse_axes_are_unions_of_public_bins(
    schema: CohortSchema, static: pd.DataFrame
) -> None:
    cells = to_cells(static, schema)
    cliques = [
        ("age",),
        ("age", "bmi"),
        ("dass_anxiety", "risk_level"),
        ("dass_depression", "dass_stress", "risk_level"),
    ]
    tables = marginal_counts(cells, schema, cliques)
    assert clique_shape(("dass_anxiety", "risk_level"), schema) == (22, 3)  # a small label axis: all bins
    assert clique_shape(("age", "bmi"), schema) == (10, 10)
    for clique in cliques:
        table = tables[clique_key(clique)]
        assert table.sum() == len(static)
    # the coarse age axis of (age, bmi) sums exactly the 1-way public bins
    assert tables["age|bmi"].sum(axis=1).sum() == tables["age"].sum()


def test_one_patient_moves_one_cell_of_each_table(schema: CohortSchema, static: pd.DataFrame) -> None:
    cliques = [("age",), ("gender", "occupation"), ("bmi", "dass_stress", "risk_level")]
    full = marginal_counts(to_cells(static, schema), schema, cliques)
    fewer = marginal_counts(to_cells(static.iloc[1:], schema), schema, cliques)
    differences = [np.abs(full[k] - fewer[k]) for k in full]
    # the L2 sensitivity of the k tables released together is sqrt(k), the noise's unit
    assert all(d.sum() == 1 and d.max() == 1 for d in differences)
    assert math.sqrt(sum((d**2).sum() for d in differences)) == pytest.approx(math.sqrt(len(cliques)))


def test_a_release_is_one_gaussian_charge_refused_past_the_budget(
    schema: CohortSchema, static: pd.DataFrame
) -> None:
    cells = to_cells(static, schema)
    ledger = PrivacyLedger(max_epsilon=3.0, delta=1e-5)
    rng = np.random.default_rng(0)
    noisy = release_marginals(
        cells, schema, [("age",), ("gender",)], ledger=ledger, noise_multiplier=2.0, rng=rng, what="t"
    )
    assert [e.mechanism for e in ledger.entries] == ["gaussian"] and ledger.entries[0].noise_multiplier == 2.0
    assert not np.allclose(noisy["age"], marginal_counts(cells, schema, [("age",)])["age"])
    with pytest.raises(BudgetExceededError):
        release_marginals(cells, schema, [("age",)], ledger=ledger, noise_multiplier=0.3, rng=rng, what="t")
    assert len(ledger.entries) == 1


@pytest.mark.parametrize(
    ("tables", "problem"),
    [
        ({"age": np.zeros(20)}, None),
        ({}, "marginal table 'age' is missing"),
        ({"age": np.zeros(19)}, "malformed (shape (19,), need (20,))"),
        ({"age": np.full(20, np.inf)}, "malformed"),
        ({"age": np.zeros(20), "bmi": np.zeros(20)}, "unexpected marginal tables ['bmi']"),
    ],
)
def test_a_hospitals_tables_are_checked_by_name(
    schema: CohortSchema, tables: dict, problem: str | None
) -> None:
    found = marginals_problem(tables, schema, [("age",)])
    assert found == problem if problem is None else problem in found


def test_selection_sees_structure_through_noise(schema: CohortSchema) -> None:
    static = generate_demo_cohort(3000, seed=5).static
    cells = to_cells(static, schema)
    pairs = [("dass_anxiety", "risk_level"), ("gender", "bmi"), ("age", "occupation")]
    rng = np.random.default_rng(1)
    survey = [
        Measurement(c, t + rng.normal(0, 10.0, t.shape), 10.0)
        for c, t in zip(pairs, marginal_counts(cells, schema, pairs).values(), strict=True)
    ]
    weights = survey_weights(survey)
    # an independent pair scores about zero once the noise's own L1 is taken off; related ones do not
    assert weights[("gender", "bmi")] < 0.2 * weights[("dass_anxiety", "risk_level")]
    assert association(np.ones((4, 4)) * 50, 0.0) == pytest.approx(0.0)
    tree = spanning_tree(weights, schema)  # only three pairs surveyed here: a forest of them
    assert len(tree) == 3
    assert ("dass_anxiety", "risk_level") in tree and ("age", "occupation") in tree
    assert label_cliques(weights, schema, 2)[:2] == [("dass_anxiety", "risk_level"), ("age", "risk_level")]
