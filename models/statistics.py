"""Histograms on the schema's public bins and SDMetrics-style column-shape scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from configs.schema import CohortSchema, ColumnSpec

Histograms = dict[str, np.ndarray]


def column_counts(values: pd.Series, spec: ColumnSpec) -> np.ndarray:
    """Counts of one column on its public cells (categories, or numeric bins)."""
    if spec.is_categorical:
        assert spec.categories is not None
        codes = pd.Categorical(values, categories=list(spec.categories)).codes
        return np.bincount(codes[codes >= 0], minlength=len(spec.categories)).astype(np.float64)
    edges = spec.bin_edges()
    clipped = np.clip(values.to_numpy(dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=edges)
    return counts.astype(np.float64)


def histogram_counts(frame: pd.DataFrame, schema: CohortSchema) -> Histograms:
    """Every static column's counts: the sufficient statistics of the handshake."""
    return {spec.name: column_counts(frame[spec.name], spec) for spec in schema.columns}


def merge_histograms(parts: list[Histograms]) -> Histograms:
    """Sum noisy counts across hospitals, then clip negatives (post-processing of DP output)."""
    merged: Histograms = {}
    for part in parts:
        for name, counts in part.items():
            merged[name] = merged.get(name, 0.0) + np.asarray(counts, dtype=np.float64)
    return {name: np.clip(counts, 0.0, None) for name, counts in merged.items()}


def _probabilities(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else np.full(len(counts), 1.0 / len(counts))


def tv_complement(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """SDMetrics TVComplement: 1 - total variation distance between two frequency vectors."""
    return float(1.0 - 0.5 * np.abs(_probabilities(p_counts) - _probabilities(q_counts)).sum())


def binned_ks_complement(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """KSComplement on binned data: 1 - max CDF gap at the public bin edges."""
    gap = np.abs(np.cumsum(_probabilities(p_counts)) - np.cumsum(_probabilities(q_counts)))
    return float(1.0 - gap.max())


def column_shape_vs_reference(
    synthetic: pd.DataFrame, reference: Histograms, schema: CohortSchema
) -> dict[str, float]:
    """Per-column shape score of synthetic rows against DP reference histograms."""
    scores: dict[str, float] = {}
    for spec in schema.columns:
        synth_counts = column_counts(synthetic[spec.name], spec)
        score_fn = tv_complement if spec.is_categorical else binned_ks_complement
        scores[spec.name] = score_fn(synth_counts, reference[spec.name])
    return scores


def column_shape_vs_real(
    synthetic: pd.DataFrame, real: pd.DataFrame, schema: CohortSchema
) -> dict[str, float]:
    """SDMetrics ColumnShapes on raw values: KSComplement (numeric), TVComplement (categorical)."""
    scores: dict[str, float] = {}
    for spec in schema.columns:
        if spec.is_categorical:
            scores[spec.name] = tv_complement(
                column_counts(synthetic[spec.name], spec), column_counts(real[spec.name], spec)
            )
        else:
            statistic = stats.ks_2samp(
                synthetic[spec.name].to_numpy(dtype=float), real[spec.name].to_numpy(dtype=float)
            ).statistic
            scores[spec.name] = float(1.0 - statistic)
    return scores


def mean_score(scores: dict[str, float]) -> float:
    return float(np.mean(list(scores.values()))) if scores else float("nan")
