"""SA-DQC: the self-adaptive data quality controller that judges every round's synthetic sample.

Three pure pieces, used by the server after each training round and on the final synthetic set:

- `score_sample`: quality of synthetic rows against the DP reference statistics (1-D histograms
  and pair tables from the handshake) plus the schema's constraints -> `QualityScores`.
- `filter_anomalies`: drops rows that break a schema constraint or that an isolation forest,
  fitted on the synthetic rows themselves, isolates as outliers; counts each removal's reason.
- `SADQC`: the adaptive controller. It sees one `QualityScores` per round, decides accept / keep /
  rollback, adapts its rollback threshold and the next round's training configuration, and logs
  every `Decision` with a reason. Its state is JSON (`state_dict` / `from_state`) so it can be
  saved with the checkpoint and a resumed run decides exactly as an uninterrupted one.

Nothing here sees real records: the references are DP releases, the samples are synthetic.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.ensemble import IsolationForest

from configs.schema import CohortSchema
from models.pairs import pair_trend_scores
from models.statistics import Histograms, column_shape_vs_reference, mean_score

logger = logging.getLogger(__name__)

STATE_VERSION = 1

# overall = 0.4 * column_shape + 0.4 * pair_trends + 0.2 * (1 - violations_rate).
# Shapes and pair trends are SDMetrics' two Quality Report properties, weighted equally; validity
# gets a smaller weight because the encoder's inverse transform already keeps rows in range, so
# violations mostly flag a broken sample rather than a gradual loss of fidelity.
SCORE_WEIGHTS: dict[str, float] = {"column_shape": 0.4, "pair_trends": 0.4, "validity": 0.2}

IFOREST_REASON = "isolation_forest"
# Below this many constraint-valid rows an isolation forest is not fitted (nothing is flagged).
_MIN_FOREST_ROWS = 20


# ---------------------------------------------------------------------------- scores
class QualityScores(BaseModel):
    """One synthetic sample's quality; every score in [0, 1], higher is better (but violations)."""

    model_config = ConfigDict(extra="forbid")

    column_shape: float
    pair_trends: float
    violations_rate: float = Field(ge=0.0, le=1.0)
    overall: float
    n_rows: int = Field(ge=0)
    per_column: dict[str, float] = Field(default_factory=dict)
    per_pair: dict[str, float] = Field(default_factory=dict)
    violations: dict[str, int] = Field(default_factory=dict)

    def headline(self) -> dict[str, float]:
        return {
            "overall": self.overall,
            "column_shape": self.column_shape,
            "pair_trends": self.pair_trends,
            "violations_rate": self.violations_rate,
        }


def overall_score(column_shape: float, pair_trends: float, violations_rate: float) -> float:
    """The documented weighted mean (`SCORE_WEIGHTS`)."""
    return (
        SCORE_WEIGHTS["column_shape"] * column_shape
        + SCORE_WEIGHTS["pair_trends"] * pair_trends
        + SCORE_WEIGHTS["validity"] * (1.0 - violations_rate)
    )


def _violation_masks(frame: pd.DataFrame, schema: CohortSchema) -> list[tuple[str, np.ndarray]]:
    """(`column:reason`, rows breaking it) for every broken constraint, in schema column order."""
    missing = [name for name in schema.column_names if name not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}")
    masks: list[tuple[str, np.ndarray]] = []

    def note(column: str, reason: str, mask: np.ndarray) -> None:
        if mask.any():
            masks.append((f"{column}:{reason}", mask))

    for spec in schema.columns:
        values = frame[spec.name]
        absent = values.isna().to_numpy()
        note(spec.name, "missing", absent)
        if spec.is_categorical:
            assert spec.categories is not None
            note(spec.name, "unknown_category", ~values.isin(list(spec.categories)).to_numpy() & ~absent)
            continue
        x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        note(spec.name, "not_numeric", np.isnan(x) & ~absent)
        with np.errstate(invalid="ignore"):
            note(spec.name, "below_min", x < spec.min)
            note(spec.name, "above_max", x > spec.max)
        if spec.kind == "integer":
            finite = np.isfinite(x)
            fractional = np.zeros(len(x), dtype=bool)
            fractional[finite] = np.abs(x[finite] - np.rint(x[finite])) > 1e-9
            note(spec.name, "not_integer", fractional)
    return masks


def constraint_violations(frame: pd.DataFrame, schema: CohortSchema) -> tuple[np.ndarray, dict[str, int]]:
    """Rows breaking a schema constraint: (bool mask of such rows, rows per `column:reason`).

    Reasons: `missing` (empty value), `unknown_category`, `not_numeric`, `below_min`,
    `above_max`, `not_integer` (a fractional value in an integer column). A row breaking several
    constraints counts under each of them but once in the mask.
    """
    bad = np.zeros(len(frame), dtype=bool)
    counts: dict[str, int] = {}
    for key, mask in _violation_masks(frame, schema):
        counts[key] = int(mask.sum())
        bad |= mask
    return bad, counts


def score_sample(
    frame: pd.DataFrame,
    reference_histograms: Histograms,
    reference_pairs: dict[str, np.ndarray],
    schema: CohortSchema,
) -> QualityScores:
    """Score synthetic rows against the DP reference statistics and the schema's constraints.

    column_shape: mean per-column score (binned KSComplement for numeric, TVComplement for
    categorical) vs the DP histograms; pair_trends: mean of `models.pairs.pair_trend_scores` vs
    the DP pair tables; violations_rate: share of rows breaking any schema constraint;
    overall: `overall_score` (weights in `SCORE_WEIGHTS`). Shapes and pairs are computed on all
    rows (out-of-range numbers fall into the outer bins, unknown categories into no cell).
    """
    per_column = column_shape_vs_reference(frame, reference_histograms, schema)
    per_pair = pair_trend_scores(frame, reference_pairs, schema)
    bad, violations = constraint_violations(frame, schema)
    rate = float(bad.mean()) if len(frame) else 0.0
    shape, pairs = mean_score(per_column), mean_score(per_pair)
    return QualityScores(
        column_shape=shape,
        pair_trends=pairs,
        violations_rate=rate,
        overall=overall_score(shape, pairs, rate),
        n_rows=len(frame),
        per_column=per_column,
        per_pair=per_pair,
        violations=violations,
    )


# ---------------------------------------------------------------------------- anomaly filter
def filter_anomalies(
    frame: pd.DataFrame,
    encoded: np.ndarray,
    *,
    schema: CohortSchema,
    contamination: float = 0.01,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop synthetic rows that break a schema constraint or look anomalous; count why.

    1. Schema constraints (`constraint_violations`): each such row is removed and counted once,
       under the first constraint it breaks (schema column order, then the order listed there).
    2. An sklearn IsolationForest (200 trees, `random_state=seed`) is fitted on the encoded rows
       that passed step 1 (rows with non-finite encodings are removed as `encoding:not_finite`)
       and removes the `contamination` share it isolates most easily, counted as
       `isolation_forest`. Skipped when contamination is 0 or fewer than 20 rows remain.

    `encoded` holds one row per frame row (the shared encoder's transform). Returns the kept
    rows (original index preserved) and `{reason: rows removed}`; the counts sum to the number
    of removed rows, and `isolation_forest` is always present.
    """
    encoded = np.asarray(encoded, dtype=np.float64)
    if encoded.ndim != 2 or len(encoded) != len(frame):
        raise ValueError(
            f"encoded must be a 2-D matrix with one row per frame row, got shape {encoded.shape}"
        )
    if not 0.0 <= contamination <= 0.5:
        raise ValueError(f"contamination must be in [0, 0.5], got {contamination}")
    reason_of = np.full(len(frame), "", dtype=object)
    for key, mask in _violation_masks(frame, schema):  # the first broken constraint names the reason
        reason_of[mask & (reason_of == "")] = key
    bad = reason_of != ""
    non_finite = ~np.isfinite(encoded).all(axis=1) & ~bad
    reason_of[non_finite] = "encoding:not_finite"
    keep = reason_of == ""

    flagged = np.zeros(len(frame), dtype=bool)
    if contamination > 0 and keep.sum() >= _MIN_FOREST_ROWS:
        forest = IsolationForest(n_estimators=200, contamination=contamination, random_state=seed)
        rows = np.flatnonzero(keep)
        flagged[rows] = forest.fit_predict(encoded[rows]) == -1
    reason_of[flagged] = IFOREST_REASON
    keep &= ~flagged

    removal: dict[str, int] = {}
    for reason in reason_of[~keep]:
        removal[reason] = removal.get(reason, 0) + 1
    removal.setdefault(IFOREST_REASON, 0)
    logger.info(
        "SA-DQC filter: kept %d of %d synthetic rows; removed %s", int(keep.sum()), len(frame), removal
    )
    return frame.loc[keep], dict(sorted(removal.items()))


# ---------------------------------------------------------------------------- controller
class SADQCConfig(BaseModel):
    """Knobs of the controller's rules (see `SADQC`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_threshold: float = Field(default=0.05, gt=0.0, le=1.0)
    min_threshold: float = Field(default=0.01, gt=0.0, le=1.0)
    tighten_factor: float = Field(default=0.25, gt=0.0)
    min_improvement: float = Field(default=0.0, ge=0.0)
    lr_decay: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_lr_multiplier: float = Field(default=0.125, gt=0.0, le=1.0)
    patience: int = Field(default=2, ge=1)
    max_extra_local_epochs: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _check_order(self) -> SADQCConfig:
        if self.min_threshold > self.initial_threshold:
            raise ValueError("min_threshold must not exceed initial_threshold")
        return self


Action = Literal["accept", "keep", "rollback", "filter"]


class Decision(BaseModel):
    """One logged SA-DQC decision; `reason` is a sentence with the numbers behind it.

    `threshold` is the tolerated drop this decision was taken with, `next_threshold` the one in
    force afterwards (smaller after an accept that tightened it); `best_*` are after the decision.
    """

    model_config = ConfigDict(extra="forbid")

    round: int
    stage: str = ""
    action: Action
    reason: str
    scores: QualityScores | None = None
    threshold: float
    next_threshold: float
    best_round: int | None = None
    best_score: float | None = None
    adjustments: dict[str, float | int] = Field(default_factory=dict)
    removed: dict[str, int] = Field(default_factory=dict)

    @property
    def restore_best(self) -> bool:
        """The caller must load the best round's weights before the next round."""
        return self.action == "rollback"

    @property
    def new_best(self) -> bool:
        """The caller must keep this round's weights as the best (checkpoint them)."""
        return self.action == "accept"


class SADQCState(BaseModel):
    """Everything the controller remembers; JSON-serialisable, persisted with the checkpoint."""

    model_config = ConfigDict(extra="forbid")

    version: int = STATE_VERSION
    stage: str = ""
    config: SADQCConfig = Field(default_factory=SADQCConfig)
    best_round: int | None = None
    best_score: float | None = None
    threshold: float = 0.05
    lr_multiplier: float = 1.0
    extra_local_epochs: int = 0
    non_improving: int = 0
    history: list[Decision] = Field(default_factory=list)


class SADQC:
    """Adaptive quality controller: one instance per trained model (stage), fed once per round.

    Rules of `observe_round(round, scores)` with s = scores.overall, b = best score so far,
    t = current threshold (tolerated drop below the best):

    - accept: first scored round, or s > b + min_improvement. This round becomes the best: the
      caller keeps (checkpoints) its weights. The non-improving counter resets and the threshold
      tightens to t = clamp(tighten_factor * (1 - s), min_threshold, initial_threshold), e.g.
      0.05 while s <= 0.80, 0.025 at s = 0.90, floored at 0.01 from s = 0.96: the better the
      generator already is, the smaller the drop that is tolerated. t never grows again.
    - keep: not a new best but b - s <= t. Training goes on from this round's weights.
    - rollback: b - s > t, or s is not finite. The caller restores the best round's weights (if
      there is no best yet, the initial weights, which it should hold as the round-0 best) and
      the learning-rate multiplier is cut: lr_multiplier = max(min_lr_multiplier,
      lr_multiplier * lr_decay) (1 -> 0.5 -> 0.25 -> 0.125 with the defaults).
    - keep and rollback count as non-improving; after `patience` consecutive non-improving rounds
      the next rounds get one more local epoch (extra_local_epochs += 1, at most
      max_extra_local_epochs) and the counter resets.

    `adjustments` of a Decision holds only what changed (`lr_multiplier`, `extra_local_epochs`);
    `training_overrides()` gives the values to apply to the next round's configuration
    (lr = base lr * lr_multiplier, local epochs = base + extra_local_epochs).
    `record_filter` logs the final set's anomaly filtering as a `filter` decision.
    """

    def __init__(self, config: SADQCConfig | None = None, *, stage: str = ""):
        config = config or SADQCConfig()
        self.state = SADQCState(stage=stage, config=config, threshold=config.initial_threshold)

    # ---------------------------------------------------------------- views
    @property
    def config(self) -> SADQCConfig:
        return self.state.config

    @property
    def history(self) -> list[Decision]:
        return self.state.history

    @property
    def best_round(self) -> int | None:
        return self.state.best_round

    @property
    def best_score(self) -> float | None:
        return self.state.best_score

    @property
    def threshold(self) -> float:
        return self.state.threshold

    def training_overrides(self) -> dict[str, float | int]:
        return {
            "lr_multiplier": self.state.lr_multiplier,
            "extra_local_epochs": self.state.extra_local_epochs,
        }

    def tightened_threshold(self, best_score: float) -> float:
        cfg = self.config
        # Rounded so float noise (0.25 * (1 - 0.8) = 0.04999...) never logs a phantom tightening.
        target = round(cfg.tighten_factor * (1.0 - best_score), 6)
        return min(self.state.threshold, max(cfg.min_threshold, min(cfg.initial_threshold, target)))

    # ---------------------------------------------------------------- rules
    def observe_round(self, server_round: int, scores: QualityScores) -> Decision:
        """Decide on one round's sample (rules in the class docstring) and log the decision."""
        st, cfg = self.state, self.config
        s = scores.overall
        threshold = st.threshold
        adjustments: dict[str, float | int] = {}
        logged: QualityScores | None = scores
        if not math.isfinite(s):
            action: Action = "rollback"
            restore = "the initial weights" if st.best_round is None else f"round {st.best_round}'s weights"
            reason = f"round {server_round}: quality score is not finite ({s}); restoring {restore}"
            logged = None  # NaN does not survive JSON
        elif st.best_score is None or s > st.best_score + cfg.min_improvement:
            action = "accept"
            if st.best_score is None:
                reason = f"round {server_round}: first scored round, quality {s:.4f} becomes the best"
            else:
                reason = (
                    f"round {server_round}: quality {s:.4f} beats the best {st.best_score:.4f} "
                    f"(round {st.best_round}) by {s - st.best_score:.4f}; keeping these weights"
                )
        elif st.best_score - s <= threshold:
            action = "keep"
            reason = (
                f"round {server_round}: quality {s:.4f} is {st.best_score - s:.4f} below the best "
                f"{st.best_score:.4f} (round {st.best_round}), within the threshold {threshold:.4f}"
            )
        else:
            action = "rollback"
            reason = (
                f"round {server_round}: quality {s:.4f} is {st.best_score - s:.4f} below the best "
                f"{st.best_score:.4f} (round {st.best_round}), beyond the threshold {threshold:.4f}; "
                f"restoring round {st.best_round}'s weights"
            )

        if action == "accept":
            st.best_round, st.best_score = server_round, s
            st.non_improving = 0
            new_threshold = self.tightened_threshold(s)
            if new_threshold < st.threshold:
                reason += f"; threshold tightened from {st.threshold:.4f} to {new_threshold:.4f}"
                st.threshold = new_threshold
        else:
            st.non_improving += 1
            if action == "rollback":
                new_lr = max(cfg.min_lr_multiplier, st.lr_multiplier * cfg.lr_decay)
                if new_lr < st.lr_multiplier:
                    reason += f"; learning-rate multiplier {st.lr_multiplier:g} -> {new_lr:g}"
                    st.lr_multiplier = new_lr
                    adjustments["lr_multiplier"] = new_lr
                else:
                    reason += f"; learning-rate multiplier already at its floor {new_lr:g}"
            if st.non_improving >= cfg.patience:
                if st.extra_local_epochs < cfg.max_extra_local_epochs:
                    st.extra_local_epochs += 1
                    adjustments["extra_local_epochs"] = st.extra_local_epochs
                    reason += (
                        f"; {st.non_improving} rounds without improvement: local epochs "
                        f"+{st.extra_local_epochs} (max +{cfg.max_extra_local_epochs})"
                    )
                st.non_improving = 0
        decision = Decision(
            round=server_round,
            stage=st.stage,
            action=action,
            reason=reason,
            scores=logged,
            threshold=threshold,
            next_threshold=st.threshold,
            best_round=st.best_round,
            best_score=st.best_score,
            adjustments=adjustments,
        )
        return self._log(decision)

    def record_filter(
        self,
        server_round: int,
        *,
        n_before: int,
        removed: dict[str, int],
        scores: QualityScores | None = None,
    ) -> Decision:
        """Log the anomaly filtering of a (final) synthetic set as a `filter` decision."""
        total = sum(removed.values())
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(removed.items()) if v) or "nothing flagged"
        share = total / n_before if n_before else 0.0
        reason = f"filtered the synthetic set: removed {total} of {n_before} rows ({share:.2%}; {detail})"
        if scores is not None and math.isfinite(scores.overall):
            reason += f"; quality of the released rows {scores.overall:.4f}"
        else:
            scores = None
        decision = Decision(
            round=server_round,
            stage=self.state.stage,
            action="filter",
            reason=reason,
            scores=scores,
            threshold=self.state.threshold,
            next_threshold=self.state.threshold,
            best_round=self.state.best_round,
            best_score=self.state.best_score,
            removed=dict(removed),
        )
        return self._log(decision)

    def _log(self, decision: Decision) -> Decision:
        self.state.history.append(decision)
        logger.info(
            "SA-DQC %s%s: %s",
            decision.action,
            f" [{decision.stage}]" if decision.stage else "",
            decision.reason,
        )
        return decision

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain dicts, lists, numbers, strings)."""
        return self.state.model_dump(mode="json")

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SADQC:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"SA-DQC state version {state.get('version')} != {STATE_VERSION}")
        controller = cls.__new__(cls)
        controller.state = SADQCState.model_validate(state)
        return controller

    def decisions(self) -> list[dict[str, Any]]:
        """The decision history as JSON dicts (what the report takes)."""
        return [d.model_dump(mode="json") for d in self.state.history]
