"""Pair statistics on the schema's public cells: mergeable 2-D counts and SDMetrics-style pair trends.

Every pair of static columns gets a contingency table whose axes are the columns' public cells
(categories, or numeric bins taken from `ColumnSpec.bin_edges()`), so a hospital can add Gaussian
noise to the raw counts, the server can add the hospitals' tables up, and the DP reference
correlations SA-DQC compares synthetic data against are post-processing of that release.

Numeric axes are coarsened to at most `PAIR_MAX_BINS` cells by keeping a subset of the public
edges (SDMetrics discretises continuous columns into 10 bins for ContingencySimilarity too). This
keeps a table at <= 100 cells for two numeric columns, so per-cell DP noise does not swamp the
counts, and a coarsened table still sums exactly to the column's 1-D histogram cells.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from configs.schema import CohortSchema, ColumnSpec
from models.statistics import merge_histograms

PairCounts = dict[str, np.ndarray]

PAIR_SEPARATOR = "|"
# Most cells a numeric column gets on a pair-table axis (SDMetrics uses 10 bins as well).
PAIR_MAX_BINS = 10


# ---------------------------------------------------------------------------- cells
def pair_key(a: str, b: str) -> str:
    """Key of the (a, b) table: `"a|b"`, with a before b in schema order."""
    return f"{a}{PAIR_SEPARATOR}{b}"


def column_pairs(schema: CohortSchema) -> list[tuple[ColumnSpec, ColumnSpec]]:
    """Every unordered pair of static columns, in schema order (9 columns -> 36 pairs)."""
    return list(itertools.combinations(schema.columns, 2))


def pair_edges(spec: ColumnSpec, max_bins: int = PAIR_MAX_BINS) -> np.ndarray:
    """A numeric column's pair-table edges: its public edges, thinned to at most `max_bins` cells.

    The kept edges are a subset of `spec.bin_edges()` (first and last always kept), so every
    pair cell is a union of whole 1-D histogram bins; nothing here depends on data.
    """
    if spec.is_categorical:
        raise ValueError(f"column '{spec.name}' is categorical and has no bin edges")
    if max_bins < 1:
        raise ValueError(f"max_bins must be >= 1, got {max_bins}")
    edges = spec.bin_edges()
    n_bins = len(edges) - 1
    if n_bins <= max_bins:
        return edges
    keep = np.unique(np.rint(np.linspace(0, n_bins, max_bins + 1)).astype(np.int64))
    return edges[keep]


def axis_cells(spec: ColumnSpec, max_bins: int = PAIR_MAX_BINS) -> int:
    """Number of cells a column has on a pair-table axis."""
    if spec.is_categorical:
        assert spec.categories is not None
        return len(spec.categories)
    return len(pair_edges(spec, max_bins)) - 1


def pair_shape(spec_a: ColumnSpec, spec_b: ColumnSpec, max_bins: int = PAIR_MAX_BINS) -> tuple[int, int]:
    return axis_cells(spec_a, max_bins), axis_cells(spec_b, max_bins)


def axis_centres(spec: ColumnSpec, max_bins: int = PAIR_MAX_BINS) -> np.ndarray:
    """Bin centres of a numeric axis (the values Pearson's r is computed on)."""
    edges = pair_edges(spec, max_bins)
    return (edges[:-1] + edges[1:]) / 2.0


def cell_codes(values: pd.Series, spec: ColumnSpec, max_bins: int = PAIR_MAX_BINS) -> np.ndarray:
    """Each value's cell index on the column's pair axis; -1 where it has no cell.

    Same rule as `models.statistics.column_counts`: unknown categories and missing values have
    no cell; numeric values outside the declared range are clipped into the outer bins.
    """
    if spec.is_categorical:
        assert spec.categories is not None
        return np.asarray(pd.Categorical(values, categories=list(spec.categories)).codes, dtype=np.int64)
    edges = pair_edges(spec, max_bins)
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    codes = np.searchsorted(edges, np.clip(x, edges[0], edges[-1]), side="right") - 1
    codes = np.clip(codes, 0, len(edges) - 2)  # the top edge belongs to the last bin (np.histogram)
    codes[np.isnan(x)] = -1  # missing or non-numeric: no cell (infinities were clipped above)
    return codes.astype(np.int64)


# ---------------------------------------------------------------------------- counts
def pair_counts(frame: pd.DataFrame, schema: CohortSchema, *, max_bins: int = PAIR_MAX_BINS) -> PairCounts:
    """2-D contingency counts of every column pair on the public cells, keyed `"a|b"`.

    Table `"a|b"` has shape `pair_shape(a, b)`: rows are a's cells, columns b's cells.

    Privacy: adding or removing one patient changes each pair table by exactly 1 in one cell
    (or leaves it unchanged if a value has no cell), so the L2 sensitivity of all P pair tables
    released together is sqrt(P) (`pair_sensitivity`), e.g. sqrt(36) = 6 for the demo schema's 9
    columns. The dict has the same form as the 1-D histograms, so
    `privacy.facade.release_noisy_histograms` (noise std = multiplier * sqrt(len(counts))) applies
    to it as is, or to the union of both dicts (sensitivity sqrt(columns + pairs)) in one release.
    """
    missing = [name for name in schema.column_names if name not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}")
    codes = {spec.name: cell_codes(frame[spec.name], spec, max_bins) for spec in schema.columns}
    tables: PairCounts = {}
    for spec_a, spec_b in column_pairs(schema):
        n_a, n_b = pair_shape(spec_a, spec_b, max_bins)
        ca, cb = codes[spec_a.name], codes[spec_b.name]
        valid = (ca >= 0) & (cb >= 0)
        flat = np.bincount(ca[valid] * n_b + cb[valid], minlength=n_a * n_b)
        tables[pair_key(spec_a.name, spec_b.name)] = flat.reshape(n_a, n_b).astype(np.float64)
    return tables


def pair_sensitivity(schema: CohortSchema) -> float:
    """L2 sensitivity of releasing every pair table once: sqrt(number of pairs)."""
    return math.sqrt(len(column_pairs(schema)))


def merge_pair_counts(parts: list[PairCounts]) -> PairCounts:
    """Sum the hospitals' noisy tables, then clip negatives (post-processing of DP output)."""
    return merge_histograms(parts)


def pair_counts_problem(
    tables: dict[str, np.ndarray], schema: CohortSchema, *, max_bins: int = PAIR_MAX_BINS
) -> str | None:
    """What is wrong with a hospital's pair tables (missing key, shape, non-finite), or None."""
    for spec_a, spec_b in column_pairs(schema):
        key = pair_key(spec_a.name, spec_b.name)
        if key not in tables:
            return f"pair table '{key}' is missing"
        table = np.asarray(tables[key])
        want = pair_shape(spec_a, spec_b, max_bins)
        if table.shape != want or not np.isfinite(table).all():
            return f"pair table '{key}' is malformed (shape {table.shape}, need {want})"
    return None


# ---------------------------------------------------------------------------- associations
def _probabilities(table: np.ndarray) -> np.ndarray:
    t = np.clip(np.asarray(table, dtype=np.float64), 0.0, None)
    total = t.sum()
    return t / total if total > 0 else np.full(t.shape, 1.0 / t.size)


def pearson_from_table(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of a 2-D histogram with cell values `x` (rows) and `y` (columns).

    Negative (noisy) counts are clipped to 0. No mass or no spread on an axis -> 0.0 (no linear
    association can be seen), rather than NaN, so scores stay defined.
    """
    t = np.clip(np.asarray(table, dtype=np.float64), 0.0, None)
    total = t.sum()
    if total <= 0:
        return 0.0
    p = t / total
    px, py = p.sum(axis=1), p.sum(axis=0)
    dx, dy = x - px @ x, y - py @ y
    var_x, var_y = px @ dx**2, py @ dy**2
    if var_x <= 0 or var_y <= 0:
        return 0.0
    r = float(dx @ p @ dy / math.sqrt(var_x * var_y))
    return max(-1.0, min(1.0, r))


def cramers_v(table: np.ndarray) -> float:
    """Cramér's V (no bias correction) of a contingency table; 0.0 if it has < 2 rows or columns.

    Empty rows and columns are dropped first (they carry no information).
    """
    t = np.clip(np.asarray(table, dtype=np.float64), 0.0, None)
    t = t[t.sum(axis=1) > 0][:, t.sum(axis=0) > 0]
    if t.size == 0 or min(t.shape) < 2:
        return 0.0
    p = t / t.sum()
    expected = np.outer(p.sum(axis=1), p.sum(axis=0))
    phi2 = float(((p - expected) ** 2 / expected).sum())
    return math.sqrt(min(1.0, phi2 / (min(t.shape) - 1)))


def correlation_from_pairs(
    table: np.ndarray, spec_a: ColumnSpec, spec_b: ColumnSpec, *, max_bins: int = PAIR_MAX_BINS
) -> float:
    """Association of a pair table: Pearson's r on bin centres if both columns are numeric,
    else Cramér's V (in [0, 1])."""
    if spec_a.is_categorical or spec_b.is_categorical:
        return cramers_v(table)
    return pearson_from_table(table, axis_centres(spec_a, max_bins), axis_centres(spec_b, max_bins))


def contingency_similarity(p_table: np.ndarray, q_table: np.ndarray) -> float:
    """SDMetrics ContingencySimilarity: 1 - total variation distance of the normalised tables."""
    return float(1.0 - 0.5 * np.abs(_probabilities(p_table) - _probabilities(q_table)).sum())


def correlation_similarity(r_synthetic: float, r_reference: float) -> float:
    """SDMetrics CorrelationSimilarity: 1 - |r_syn - r_ref| / 2."""
    return float(1.0 - abs(r_synthetic - r_reference) / 2.0)


def _checked_reference(
    reference_pairs: dict[str, np.ndarray], spec_a: ColumnSpec, spec_b: ColumnSpec, max_bins: int
) -> np.ndarray:
    key = pair_key(spec_a.name, spec_b.name)
    if key not in reference_pairs:
        raise ValueError(f"reference pair table '{key}' is missing")
    table = np.asarray(reference_pairs[key], dtype=np.float64)
    want = pair_shape(spec_a, spec_b, max_bins)
    if table.shape != want:
        raise ValueError(f"reference pair table '{key}' has shape {table.shape}, need {want}")
    return table


def pair_trend_scores(
    synthetic: pd.DataFrame,
    reference_pairs: dict[str, np.ndarray],
    schema: CohortSchema,
    *,
    max_bins: int = PAIR_MAX_BINS,
) -> dict[str, float]:
    """Per-pair trend score in [0, 1] of synthetic rows against the (DP) reference tables.

    Numeric-numeric pairs: CorrelationSimilarity of Pearson's r (both from the binned tables, so
    binning affects both sides alike). Any categorical column involved: ContingencySimilarity.
    """
    synthetic_pairs = pair_counts(synthetic, schema, max_bins=max_bins)
    scores: dict[str, float] = {}
    for spec_a, spec_b in column_pairs(schema):
        key = pair_key(spec_a.name, spec_b.name)
        ref = _checked_reference(reference_pairs, spec_a, spec_b, max_bins)
        syn = synthetic_pairs[key]
        if spec_a.is_categorical or spec_b.is_categorical:
            scores[key] = contingency_similarity(syn, ref)
        else:
            scores[key] = correlation_similarity(
                correlation_from_pairs(syn, spec_a, spec_b, max_bins=max_bins),
                correlation_from_pairs(ref, spec_a, spec_b, max_bins=max_bins),
            )
    return scores


def association_differences(
    synthetic: pd.DataFrame,
    reference_pairs: dict[str, np.ndarray],
    schema: CohortSchema,
    *,
    max_bins: int = PAIR_MAX_BINS,
) -> dict[str, float]:
    """Synthetic minus reference association per pair (Pearson's r or Cramér's V): the report's
    correlation-difference heatmap."""
    synthetic_pairs = pair_counts(synthetic, schema, max_bins=max_bins)
    out: dict[str, float] = {}
    for spec_a, spec_b in column_pairs(schema):
        key = pair_key(spec_a.name, spec_b.name)
        ref = _checked_reference(reference_pairs, spec_a, spec_b, max_bins)
        out[key] = correlation_from_pairs(
            synthetic_pairs[key], spec_a, spec_b, max_bins=max_bins
        ) - correlation_from_pairs(ref, spec_a, spec_b, max_bins=max_bins)
    return out
