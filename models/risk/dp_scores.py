"""Risk-model figures from DP count tables: what a hospital releases about its held-out patients
and what the server computes from the noisy sums (confusion, binned ROC, calibration).

Per model, a hospital counts its held-out patients in two tables: the confusion matrix (true class
x predicted class) and the flagged class's score histogram by truth (flagged or not x score bin,
bins on public edges). Adding or removing one patient moves one count by one in each table, so a
release of both tables for m models has L2 sensitivity sqrt(2 m). Everything after the noise is
post-processing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.risk.scores import ACTION_PRECISION
from privacy.dp_audit import binned_auc, roc_points

# Public edges of the flagged class's probability: finer where a clinic sets its threshold.
SCORE_EDGES: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95)
CONFUSION, FLAGGED = "confusion", "flagged"  # the two tables' names in a reply ("<folder>.<table>")


def score_bin_centres() -> np.ndarray:
    """The middle of each score bin (the calibration plot's x and the binned Brier's forecast)."""
    edges = np.r_[0.0, SCORE_EDGES, 1.0]
    return (edges[:-1] + edges[1:]) / 2.0


def evaluation_tables(probabilities: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """The exact (n_classes, n_classes) confusion counts and the (2, bins) flagged-score counts
    (row 0: patients of the flagged class, row 1: the others), before any noise."""
    flagged = n_classes - 1
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes))
    np.add.at(confusion, (truth, predicted), 1.0)
    bins = np.searchsorted(np.asarray(SCORE_EDGES), probabilities[:, flagged], side="right")
    scores = np.zeros((2, len(SCORE_EDGES) + 1))
    np.add.at(scores, ((truth != flagged).astype(int), bins), 1.0)
    return {CONFUSION: confusion, FLAGGED: scores}


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


def confusion_figures(confusion: np.ndarray) -> dict[str, float]:
    """Macro-F1, the flagged class's F1 and accuracy from (noisy) counts, clipped at 0 first."""
    table = np.clip(np.asarray(confusion, dtype=np.float64), 0.0, None)
    tp = np.diag(table)
    f1 = [_f1(tp[k], table[:, k].sum() - tp[k], table[k].sum() - tp[k]) for k in range(len(table))]
    return {
        "macro_f1": float(np.mean(f1)),
        "high_risk_f1": float(f1[-1]),
        "accuracy": float(tp.sum() / max(table.sum(), 1e-12)),
    }


def _recall_at_precision(positives: np.ndarray, negatives: np.ndarray, precision: float) -> float:
    """The highest recall among the bin thresholds whose precision reaches `precision`."""
    pos = np.cumsum(np.clip(positives, 0.0, None)[::-1])
    neg = np.cumsum(np.clip(negatives, 0.0, None)[::-1])
    reached = [p / pos[-1] for p, n in zip(pos, neg, strict=True) if p > 0 and p / (p + n) >= precision]
    return float(max(reached)) if reached and pos[-1] > 0 else 0.0


def flagged_figures(scores: np.ndarray) -> dict[str, Any]:
    """AUROC of the flagged class against the rest (binned ROC, ties within a bin counted half),
    recall at the action precision, binned Brier score, ROC points and the calibration curve."""
    positives, negatives = (np.asarray(row, dtype=np.float64) for row in scores)
    fpr, tpr = roc_points(positives, negatives)
    centres = score_bin_centres()
    clipped = np.clip(np.stack([positives, negatives]), 0.0, None)
    totals = clipped.sum(axis=0)
    # Binned Brier of the flagged class: each patient's forecast is its bin's centre.
    brier = float(
        (clipped[0] @ (1.0 - centres) ** 2 + clipped[1] @ centres**2) / max(float(totals.sum()), 1e-12)
    )
    observed = np.where(totals > 0, clipped[0] / np.maximum(totals, 1e-12), np.nan)
    return {
        "high_risk_auroc": binned_auc(positives, negatives),
        "high_risk_recall_at_90_precision": _recall_at_precision(positives, negatives, ACTION_PRECISION),
        "high_risk_brier_binned": brier,
        "roc_fpr": fpr.tolist(),
        "roc_tpr": tpr.tolist(),
        "calibration_forecast": centres.tolist(),
        "calibration_observed": [None if np.isnan(v) else float(v) for v in observed],
        "calibration_patients": totals.tolist(),
    }


def table_figures(tables: dict[str, np.ndarray], noise_sd: float) -> dict[str, Any]:
    """Every figure of one model from its (noisy, possibly summed) tables; `noise_sd` per count."""
    confusion = np.asarray(tables[CONFUSION], dtype=np.float64)
    return {
        **confusion_figures(confusion),
        **flagged_figures(tables[FLAGGED]),
        "confusion": confusion.tolist(),
        "patients": float(np.clip(confusion, 0.0, None).sum()),
        "noise_sd": float(noise_sd),
    }
