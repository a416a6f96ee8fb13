"""How well class probabilities flag the label: the figures every risk route is reported with."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

# The precision at which a clinic would act on a flag; recall is reported there.
ACTION_PRECISION = 0.9


def recall_at_precision(truth: np.ndarray, scores: np.ndarray, precision: float = ACTION_PRECISION) -> float:
    """The highest recall of any threshold whose precision reaches `precision` (0 when none does)."""
    if not truth.any():
        return float("nan")
    precisions, recalls, _ = precision_recall_curve(truth, scores)
    reached = recalls[precisions >= precision]
    return float(reached.max()) if len(reached) else 0.0


def risk_scores(probabilities: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[str, float]:
    """Macro-F1, the last class's F1 (the one to flag, e.g. "high"), its recall at 90% precision and
    its own AUROC against the rest, one-vs-rest AUROC over the classes present, and the multi-class
    Brier score.

    Args:
        probabilities: (rows, n_classes), rows summing to 1.
        truth: class index of each row.
    """
    predicted = probabilities.argmax(axis=1)
    flagged = n_classes - 1
    present = sorted(set(truth.tolist()))
    onehot = np.eye(n_classes)[truth]
    return {
        "auroc": float(roc_auc_score(truth, probabilities[:, present], multi_class="ovr", labels=present))
        if len(present) > 2
        else float("nan"),
        "macro_f1": float(f1_score(truth, predicted, average="macro", labels=range(n_classes))),
        "high_risk_f1": float(f1_score(truth == flagged, predicted == flagged)),
        "high_risk_auroc": float(roc_auc_score(truth == flagged, probabilities[:, flagged]))
        if 0 < (truth == flagged).sum() < len(truth)
        else float("nan"),
        "high_risk_recall_at_90_precision": recall_at_precision(truth == flagged, probabilities[:, flagged]),
        "brier": float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1))),
    }
