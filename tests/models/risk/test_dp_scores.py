"""Risk figures from count tables: exact where the tables are exact, close to the per-patient
figures where they are binned, and robust to the noise a DP release adds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.risk.dp_scores import CONFUSION, FLAGGED, evaluation_tables, table_figures
from models.risk.scores import risk_scores

N_CLASSES = 3


def _predictions(n: int, seed: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities that track the truth by `signal` (0: none)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(N_CLASSES, size=n, p=[0.5, 0.3, 0.2])
    logits = rng.normal(size=(n, N_CLASSES)) + signal * np.eye(N_CLASSES)[truth]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, truth


def test_tables_count_each_patient_once_in_each() -> None:
    probabilities, truth = _predictions(500, seed=1, signal=2.0)
    tables = evaluation_tables(probabilities, truth, N_CLASSES)
    assert tables[CONFUSION].sum() == tables[FLAGGED].sum() == 500
    assert tables[FLAGGED][0].sum() == (truth == N_CLASSES - 1).sum()


@pytest.mark.parametrize("signal", [0.0, 1.5, 4.0])
def test_exact_tables_give_the_per_patient_figures(signal: float) -> None:
    probabilities, truth = _predictions(3000, seed=2, signal=signal)
    figures = table_figures(evaluation_tables(probabilities, truth, N_CLASSES), noise_sd=0.0)
    exact = risk_scores(probabilities, truth, N_CLASSES)
    # F1 from the confusion counts is exact
    assert figures["macro_f1"] == pytest.approx(exact["macro_f1"], abs=1e-9)
    assert figures["high_risk_f1"] == pytest.approx(exact["high_risk_f1"], abs=1e-9)
    # the flagged class's AUROC on ten public bins: close to the per-patient one
    flagged = truth == N_CLASSES - 1
    assert figures["high_risk_auroc"] == pytest.approx(roc_auc_score(flagged, probabilities[:, -1]), abs=0.02)
    assert figures["high_risk_recall_at_90_precision"] <= exact["high_risk_recall_at_90_precision"] + 1e-9


def test_noisy_tables_keep_the_figures_within_the_noise() -> None:
    probabilities, truth = _predictions(2000, seed=3, signal=2.5)
    tables = evaluation_tables(probabilities, truth, N_CLASSES)
    exact = table_figures(tables, noise_sd=0.0)
    rng = np.random.default_rng(0)
    noisy = [
        table_figures({k: v + rng.normal(0, 5.0, v.shape) for k, v in tables.items()}, noise_sd=5.0)
        for _ in range(20)
    ]
    for key in ("macro_f1", "high_risk_auroc"):
        assert abs(np.mean([f[key] for f in noisy]) - exact[key]) < 0.02, key
    assert all(f["noise_sd"] == 5.0 for f in noisy)
    # a model without signal stays at chance however the noise falls
    chance = table_figures(
        evaluation_tables(*_predictions(2000, seed=4, signal=0.0), N_CLASSES), noise_sd=0.0
    )
    assert abs(chance["high_risk_auroc"] - 0.5) < 0.05
