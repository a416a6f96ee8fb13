"""Tests for models.numeric_moments: the DP release of the numeric columns' second moments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from configs.schema import load_schema
from models.numeric_moments import (
    NUMERIC_CLIP,
    numeric_correlations,
    numeric_products_problem,
    numeric_sensitivity,
    numeric_specs,
    numeric_standardisation,
    release_numeric_products,
)
from models.pairs import pair_key
from models.sequence.moments import MOMENT_BLOCKS
from models.statistics import histogram_counts
from privacy.facade import gaussian_noise_multiplier, release_noisy_histograms
from privacy.ledger import BudgetExceededError, PrivacyLedger
from simulation.cohort import generate_demo_cohort

DELTA = 1e-5


class _NoNoise:
    """A generator whose Gaussian draws are all zero: the release's sums as they are, so a test
    can compare neighbouring datasets exactly."""

    def normal(self, loc: float, scale: float, size: tuple[int, ...]) -> np.ndarray:
        return np.zeros(size)


SCHEMA = load_schema()
NAMES = [spec.name for spec in numeric_specs(SCHEMA)]


@pytest.fixture(scope="module")
def static() -> pd.DataFrame:
    return generate_demo_cohort(4000, seed=3).static


def _release(frame: pd.DataFrame, z: float, seed: int, ledger: PrivacyLedger | None = None) -> np.ndarray:
    """A hospital's handshake: its DP histograms, then the numeric moments standardised by them."""
    ledger = ledger or PrivacyLedger(max_epsilon=1e12, delta=DELTA)
    rng = np.random.default_rng(seed)
    counts = histogram_counts(frame, SCHEMA)
    histograms = release_noisy_histograms(counts, ledger=ledger, rng=rng, noise_multiplier=z)
    return release_numeric_products(frame, SCHEMA, histograms, ledger=ledger, noise_multiplier=z, rng=rng)


def _pearson(frame: pd.DataFrame) -> dict[str, float]:
    r = frame[NAMES].astype(float).corr()
    return {pair_key(a, b): float(r.loc[a, b]) for i, a in enumerate(NAMES) for b in NAMES[i + 1 :]}


def test_with_little_noise_the_correlations_are_the_data_s(static: pd.DataFrame) -> None:
    released = numeric_correlations(_release(static, z=1e-3, seed=0), SCHEMA)
    exact = _pearson(static)
    assert released.keys() == exact.keys() and len(exact) == 10
    for key, r in exact.items():
        assert released[key] == pytest.approx(r, abs=0.05), key  # clipping lowers r a little


def test_hospitals_merge_into_the_pooled_correlations(static: pd.DataFrame) -> None:
    """Each hospital standardises by its own DP histograms; back on the columns' scale the sums
    add up to the pooled data's, between-hospital differences included."""
    severe = static["dass_depression"] > static["dass_depression"].median()
    parts = [static[severe], static[~severe]]  # very different case mix
    merged = sum(_release(part, z=1e-3, seed=i) for i, part in enumerate(parts))
    released = numeric_correlations(merged, SCHEMA)
    for key, r in _pearson(static).items():
        assert released[key] == pytest.approx(r, abs=0.05), key


def test_at_the_demo_s_noise_three_hospitals_get_close(static: pd.DataFrame) -> None:
    """The demo's handshake: epsilon 1 over its releases at each of 3 hospitals. The pair tables
    at this noise gave depression~anxiety r 0.11 for a real 0.63."""
    z = gaussian_noise_multiplier(epsilon=1.0, delta=DELTA) * np.sqrt(3 + len(MOMENT_BLOCKS))
    thirds = np.array_split(static.sample(frac=1.0, random_state=0), 3)
    exact = _pearson(static)
    errors = []
    for seed in range(5):
        merged = sum(_release(part, z=z, seed=10 * seed + i) for i, part in enumerate(thirds))
        released = numeric_correlations(merged, SCHEMA)
        errors.append([abs(released[k] - r) for k, r in exact.items()])
    # measured: mean 0.042, worst pair of a draw 0.10 on average (12 draws)
    assert np.mean(errors) < 0.06 and np.max(errors) < 0.2, np.round(errors, 2)


def test_a_record_s_influence_stays_within_the_sensitivity(static: pd.DataFrame) -> None:
    """Adding one extreme record (every column at its range's far end) moves the exact sums by
    at most the declared sensitivity."""
    extreme = static.iloc[:1].copy()
    for spec in numeric_specs(SCHEMA):
        extreme[spec.name] = spec.max
    base = static.iloc[:300]
    counts = histogram_counts(base, SCHEMA)  # the same standardisation either way

    def products(frame: pd.DataFrame) -> np.ndarray:
        ledger = PrivacyLedger(max_epsilon=1e3, delta=DELTA)
        return release_numeric_products(
            frame, SCHEMA, counts, ledger=ledger, noise_multiplier=1.0, rng=_NoNoise()
        )

    # the release returns the columns' scale; compare in the standardised units it clips in
    with_extreme, without = products(pd.concat([base, extreme])), products(base)
    specs = numeric_specs(SCHEMA)
    centre, scale = numeric_standardisation(counts, SCHEMA)
    to_unit = np.eye(len(specs) + 1)
    to_unit[:-1, :-1] = np.diag(1 / scale)
    to_unit[:-1, -1] = -centre / scale
    change = to_unit @ (with_extreme - without) @ to_unit.T
    assert np.linalg.norm(change) <= numeric_sensitivity(SCHEMA) + 1e-6
    assert np.linalg.norm(change) > 0.9 * (NUMERIC_CLIP**2 * len(specs))  # it was clipped, not lost


def test_the_release_is_charged_once_and_refused_whole_over_budget(static: pd.DataFrame) -> None:
    ledger = PrivacyLedger(max_epsilon=1e6, delta=DELTA)
    counts = histogram_counts(static, SCHEMA)
    release_numeric_products(
        static, SCHEMA, counts, ledger=ledger, noise_multiplier=5.0, rng=np.random.default_rng(0)
    )
    assert [(e.what, e.mechanism, e.noise_multiplier) for e in ledger.entries] == [
        ("handshake numeric moments", "gaussian", 5.0)
    ]
    tight = PrivacyLedger(max_epsilon=0.1, delta=DELTA)
    with pytest.raises(BudgetExceededError):
        release_numeric_products(
            static, SCHEMA, counts, ledger=tight, noise_multiplier=1.0, rng=np.random.default_rng(0)
        )
    assert tight.entries == [] and tight.spent() == 0.0


def test_malformed_moments_are_named() -> None:
    k = len(NAMES) + 1
    assert numeric_products_problem(np.eye(k), SCHEMA) is None
    assert (
        numeric_products_problem(np.eye(k - 1), SCHEMA)
        == f"numeric moments have shape {(k - 1, k - 1)}, expected {(k, k)}"
    )
    broken = np.eye(k)
    broken[0, 1] = np.nan
    assert numeric_products_problem(broken, SCHEMA) == "numeric moments are not finite"


def test_a_variance_the_noise_left_negative_claims_no_correlation() -> None:
    products = np.eye(len(NAMES) + 1) * 100.0
    products[0, 0] = -5.0  # the first column's "variance" is negative
    products[0, 1] = products[1, 0] = 50.0
    r = numeric_correlations(products, SCHEMA)
    assert r[pair_key(NAMES[0], NAMES[1])] == 0.0
    assert all(-0.99 <= value <= 0.99 for value in r.values())
