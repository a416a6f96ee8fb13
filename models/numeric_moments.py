"""DP second moments of the numeric static columns: how they go together, for the static generator."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from configs.schema import CohortSchema, ColumnSpec
from models.pairs import column_pairs, pair_key
from models.statistics import Histograms
from privacy.ledger import PrivacyLedger

# Each record's standardised numeric columns are clipped to this RMS per column (in the
# hospital's own DP sd units). For 5 roughly normal columns |v|^2 is about chi-squared(5): 1.2
# shrinks about a fifth of the records towards the centre, which lowers r a little (0.023 on
# average without noise), and the noise falls with the bound's square. Measured at the demo's
# noise (3 hospitals, 12 draws, 10 pairs): mean |r error| 0.042 at 1.2, 0.048 at 1.35, 0.056 at
# 1.5, 0.080 at 1.8; the worst pair of a draw is off by 0.10 at 1.2 (0.19 at 1.8).
NUMERIC_CLIP = 1.2
NUMERIC_KEY = "products"


def numeric_specs(schema: CohortSchema) -> list[ColumnSpec]:
    """The schema's numeric (integer or continuous) columns, in schema order."""
    return [spec for spec in schema.columns if not spec.is_categorical]


def _centre_and_scale(histograms: Histograms, spec: ColumnSpec) -> tuple[float, float]:
    """Median and IQR / 1.349 (the sd, were it normal) of a column from its (noisy) histogram on
    the public bins; the range's middle and a quarter of its width where noise leaves no spread.

    Quantiles of the cumulated noisy counts, not their moments: at the demo's noise the moment
    estimates put a hospital's DASS sd anywhere from 2.4 to 8.5 (real 7.8), and every r off by up
    to 0.35; with quartiles the release comes within 0.01 of using each hospital's exact mean and sd.
    """
    assert spec.min is not None and spec.max is not None
    edges = spec.bin_edges()
    counts = np.asarray(histograms[spec.name], dtype=np.float64)
    cumulative = np.maximum.accumulate(np.concatenate([[0.0], np.cumsum(counts)]))
    if cumulative[-1] > 0:
        low, median, high = np.interp([0.25, 0.5, 0.75], cumulative / cumulative[-1], edges)
        if high > low:
            return float(median), float((high - low) / 1.349)
    return (spec.min + spec.max) / 2, (spec.max - spec.min) / 4


def numeric_standardisation(histograms: Histograms, schema: CohortSchema) -> tuple[np.ndarray, np.ndarray]:
    """Per numeric column: the centre and scale a hospital standardises its records by."""
    pairs = [_centre_and_scale(histograms, spec) for spec in numeric_specs(schema)]
    centre, scale = np.array(pairs, dtype=np.float64).reshape(-1, 2).T
    return centre, scale


def numeric_sensitivity(schema: CohortSchema) -> float:
    """L2 sensitivity of the release: one record adds a a^T with a = (v, 1), |v| <= tau, and a
    positive semi-definite matrix's Frobenius norm is at most its trace |a|^2 <= tau^2 + 1."""
    return (NUMERIC_CLIP**2) * len(numeric_specs(schema)) + 1.0


def release_numeric_products(
    static: pd.DataFrame,
    schema: CohortSchema,
    histograms: Histograms,
    *,
    ledger: PrivacyLedger,
    noise_multiplier: float,
    rng: np.random.Generator,
    what: str = "handshake numeric moments",
) -> np.ndarray:
    """One Gaussian release of sum a a^T over records, a = (numeric columns standardised, 1),
    returned on the columns' own scale ((k + 1, k + 1): products, sums, count) so hospitals
    merge by adding.

    Standardising uses this hospital's own DP `histograms` (post-processing of a release
    already charged), so the clip bound sits near the records' real spread and one record's
    influence stays bounded whatever the others are. The pair tables carry the same
    association, but 36 tables at once share one budget: their r came out 0.11 where the
    cohort's depression~anxiety is 0.63.
    """
    specs = numeric_specs(schema)
    ledger.check(what, noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
    centre, scale = numeric_standardisation(histograms, schema)
    v = (static[[s.name for s in specs]].to_numpy(dtype=np.float64) - centre) / scale
    bound = NUMERIC_CLIP * math.sqrt(len(specs))
    v *= np.minimum(1.0, bound / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
    a = np.hstack([v, np.ones((len(v), 1))])
    sigma = noise_multiplier * numeric_sensitivity(schema)
    noisy = a.T @ a + rng.normal(0.0, sigma, (a.shape[1], a.shape[1]))
    ledger.charge_gaussian(what, noise_multiplier=noise_multiplier)
    # Back to the columns' scale: a_raw = T a with T = [[diag(scale), centre], [0, 1]].
    to_raw = np.eye(len(specs) + 1)
    to_raw[:-1, :-1] = np.diag(scale)
    to_raw[:-1, -1] = centre
    return to_raw @ ((noisy + noisy.T) / 2) @ to_raw.T


def numeric_products_problem(products: np.ndarray, schema: CohortSchema) -> str | None:
    """Why a hospital's numeric moments cannot be merged (shape, non-finite values), or None."""
    k = len(numeric_specs(schema)) + 1
    if products.shape != (k, k):
        return f"numeric moments have shape {products.shape}, expected {(k, k)}"
    if not np.isfinite(products).all():
        return "numeric moments are not finite"
    return None


def numeric_correlations(products: np.ndarray, schema: CohortSchema) -> dict[str, float]:
    """Pearson's r of every pair of numeric columns, keyed `"a|b"` like the pair tables.

    On the raw values, where the generator's pair loss compares normal scores: on the demo
    cohort the two agree to 0.01; for a strongly skewed or bounded column they can drift apart.
    Noise can leave a variance at or below zero; such a pair gets r = 0 (no claim), and every r is
    kept inside (-0.99, 0.99).
    """
    specs = numeric_specs(schema)
    count = max(float(products[-1, -1]), 1.0)
    mean = products[:-1, -1] / count
    cov = products[:-1, :-1] / count - np.outer(mean, mean)
    index = {spec.name: i for i, spec in enumerate(specs)}
    out: dict[str, float] = {}
    for spec_a, spec_b in column_pairs(schema):
        if spec_a.name not in index or spec_b.name not in index:
            continue
        i, j = index[spec_a.name], index[spec_b.name]
        denominator = math.sqrt(max(cov[i, i], 0.0) * max(cov[j, j], 0.0))
        r = cov[i, j] / denominator if denominator > 0 else 0.0
        out[pair_key(spec_a.name, spec_b.name)] = float(np.clip(r, -0.99, 0.99))
    return out
