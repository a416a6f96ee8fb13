"""`gbm`: histogram gradient boosting on the profile and weekly summaries, synthetic route only.

Its trees are kept as plain arrays (feature, threshold, children, leaf value per node) and walked
here to predict, so a bundle holds named tensors, never a pickled estimator.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.ensemble import HistGradientBoostingClassifier

from models.base import FitReport, LocalData, LocalRound, ModelKind
from models.encoder import EncoderError, TabularEncoder
from models.risk.features import (
    RiskInputs,
    balanced_weights,
    checked_weeks,
    prior_corrected,
    profile_features,
    targets,
    week_summaries,
)

TREE_FIELDS = ("feature", "threshold", "left", "right", "is_leaf", "value")


class GradientBoostingRisk(RiskInputs):
    """Gradient-boosted trees of the label, trained on synthetic rows (it has no DP-SGD form)."""

    kind: ClassVar[ModelKind] = ModelKind.RISK_MODEL
    releases: ClassVar[tuple[str, ...]] = ()
    phases: ClassVar[tuple[str, ...]] = ()
    federated: ClassVar[bool] = False  # trees are grown from exact splits of rows: no DP-SGD route
    registry_name: ClassVar[str]

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        use_week: bool = True
        max_iter: int = Field(default=200, ge=1, le=2000)
        learning_rate: float = Field(default=0.1, gt=0, le=1)
        max_leaf_nodes: int = Field(default=31, ge=2, le=255)

    def __init__(self, encoder: TabularEncoder, config: Config | dict | None, *, seed: int = 0):
        self._read_inputs(encoder, config)
        self.seed = seed
        self.trees: dict[str, np.ndarray] = {}

    def _features(self, data: LocalData) -> np.ndarray:
        weeks = checked_weeks(data, self.uses_week, self.n_channels)
        profile = profile_features(data.profiles, self.label)
        return np.concatenate([profile, week_summaries(weeks, len(profile))], axis=1)

    # ---------------------------------------------------------------- training
    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        raise EncoderError("gbm trains on the synthetic cohort only; it cannot be a federated DP-SGD stage")

    def fit_offline(self, data: LocalData, *, seed: int, device: torch.device) -> FitReport:
        """Fit without DP (released synthetic rows, or the simulation's ceiling), classes balanced."""
        y = targets(data.profiles, self.label)
        estimator = HistGradientBoostingClassifier(
            max_iter=self.config.max_iter,
            learning_rate=self.config.learning_rate,
            max_leaf_nodes=self.config.max_leaf_nodes,
            class_weight="balanced",
            early_stopping=False,
            random_state=seed,
        )
        estimator.fit(self._features(data), y)
        self.trees = _tree_arrays(estimator, len(self.classes))
        shares = np.bincount(y, minlength=len(self.classes)) / max(len(y), 1)
        self.trees["class_weights"] = balanced_weights(shares).astype(np.float64)
        return FitReport(steps=estimator.n_iter_)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"trees.{k}": torch.from_numpy(v.copy()) for k, v in self.trees.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        wanted = {f"trees.{k}" for k in (*TREE_FIELDS, "offsets", "output", "baseline", "class_weights")}
        if set(state) and set(state) != wanted:  # empty: an unfitted model
            raise KeyError(f"gbm state needs {sorted(wanted)}, got {sorted(state)[:8]}")
        self.trees = {k.removeprefix("trees."): v.detach().cpu().numpy() for k, v in state.items()}

    # ---------------------------------------------------------------- prediction
    def predict_proba(self, data: LocalData) -> np.ndarray:
        if not self.trees:
            raise EncoderError("gbm is not fitted yet")
        raw = _raw_scores(self.trees, self._features(data).astype(np.float64))
        # trained class-balanced: mapped back to the training prevalence
        return prior_corrected(_probabilities(raw, len(self.classes)), self.trees["class_weights"])


def _tree_arrays(estimator: HistGradientBoostingClassifier, n_classes: int) -> dict[str, np.ndarray]:
    """Every tree's nodes as flat arrays (children relative to the tree's first node), which
    output each tree adds to, and the baseline; outputs are over all the label's classes."""
    present = np.asarray(estimator.classes_, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in TREE_FIELDS}
    offsets, outputs = [0], []
    for iteration in estimator._predictors:
        for k, predictor in enumerate(iteration):
            nodes = predictor.nodes
            parts["feature"].append(nodes["feature_idx"].astype(np.int64))
            parts["threshold"].append(nodes["num_threshold"].astype(np.float64))
            parts["left"].append(nodes["left"].astype(np.int64))
            parts["right"].append(nodes["right"].astype(np.int64))
            parts["is_leaf"].append(nodes["is_leaf"].astype(np.int64))
            parts["value"].append(nodes["value"].astype(np.float64))
            offsets.append(offsets[-1] + len(nodes))
            # binary: one tree per iteration scoring the second present class against the first
            outputs.append(present[1] if len(iteration) == 1 else present[k])
    baseline = np.full(n_classes, -np.inf)
    base = np.asarray(estimator._baseline_prediction, dtype=np.float64).ravel()
    if len(present) == 2:
        baseline[present[0]], baseline[present[1]] = 0.0, base[0]
    else:
        baseline[present] = base
    return {
        **{name: np.concatenate(values) for name, values in parts.items()},
        "offsets": np.asarray(offsets, dtype=np.int64),
        "output": np.asarray(outputs, dtype=np.int64),
        "baseline": baseline,
    }


def _raw_scores(trees: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Baseline plus each tree's leaf value, per row and class (left when value <= threshold)."""
    raw = np.tile(trees["baseline"], (len(x), 1))
    rows = np.arange(len(x))
    for t in range(len(trees["output"])):
        start = trees["offsets"][t]
        node = np.full(len(x), start)
        while True:
            inner = trees["is_leaf"][node] == 0
            if not inner.any():
                break
            go_left = x[rows, trees["feature"][node]] <= trees["threshold"][node]
            child = np.where(go_left, trees["left"][node], trees["right"][node]) + start
            node = np.where(inner, child, node)
        raw[:, trees["output"][t]] += trees["value"][node]
    return raw


def _probabilities(raw: np.ndarray, n_classes: int) -> np.ndarray:
    """Softmax over the classes the trees saw (a class absent from training gets probability 0)."""
    finite = np.where(np.isfinite(raw), raw, -np.inf)
    shifted = np.exp(finite - finite.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
