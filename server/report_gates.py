"""Audit pass/fail gates: thresholds, per-gate results, and their evaluation on the audit's figures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The row every hospital's figures pooled into (vertical averaging): the gates' evidence.
POOLED = "all hospitals"


class GateThresholds(BaseModel):
    """Pass/fail thresholds of the audit; each gate is checked on the worst hospital and attack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attack_auc: float = Field(default=0.55, ge=0.0, le=1.0)
    max_attack_auc_ci_high: float = Field(default=0.60, ge=0.0, le=1.0)
    max_tpr_at_1pct_fpr: float = Field(default=0.03, ge=0.0, le=1.0)
    min_dcr_protection: float = Field(default=0.90, ge=0.0, le=1.0)


class GateResult(BaseModel):
    """One gate: the worst value over hospitals (and attacks), where it occurred, PASS/FAIL."""

    model_config = ConfigDict(extra="forbid")

    name: str
    metric: str
    comparator: Literal["<=", ">="]
    threshold: float
    value: float | None
    worst: str
    passed: bool


def finite(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, not a number, NaN or infinite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _gate(
    name: str,
    metric: str,
    comparator: Literal["<=", ">="],
    threshold: float,
    rows: list[tuple[str, Any]],
) -> GateResult:
    """Worst value among `(where, value)` rows; missing or non-finite evidence fails the gate."""
    values = [(where, finite(v)) for where, v in rows]
    if not values:
        return GateResult(
            name=name, metric=metric, comparator=comparator, threshold=threshold, value=None,
            worst="no results", passed=False,
        )  # fmt: skip
    broken = [where for where, v in values if v is None]
    if broken:
        return GateResult(
            name=name, metric=metric, comparator=comparator, threshold=threshold, value=None,
            worst=f"not finite: {broken[0]}", passed=False,
        )  # fmt: skip
    pick = max if comparator == "<=" else min
    where, value = pick(values, key=lambda row: row[1])  # type: ignore[arg-type, return-value]
    assert value is not None
    passed = value <= threshold if comparator == "<=" else value >= threshold
    return GateResult(
        name=name, metric=metric, comparator=comparator, threshold=threshold, value=value,
        worst=where, passed=passed,
    )  # fmt: skip


def _pooled(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pooled rows when there are any (a DP audit), else every row."""
    pooled = [r for r in rows if r.get("hospital") == POOLED]
    return pooled or list(rows)


def evaluate_gates(
    dcr: Sequence[Mapping[str, Any]], attacks: Sequence[Mapping[str, Any]], gates: GateThresholds
) -> list[GateResult]:
    """The gates on the pooled figures: the worst attack's AUC, AUC interval upper bound and TPR at
    1% FPR (its interval's lower bound), the DCR protection; and per hospital, that no attack's AUC
    is significantly above the AUC gate (its interval's lower bound). No results, or a non-finite
    one, fail."""
    pooled = _pooled(attacks)
    where = [f"{a.get('hospital', '?')} / {a.get('name', '?')}" for a in pooled]
    per_hospital = [a for a in attacks if a.get("hospital") != POOLED]
    return [
        _gate(
            "membership attack AUC",
            "auc",
            "<=",
            gates.max_attack_auc,
            [(w, a.get("auc")) for w, a in zip(where, pooled, strict=True)],
        ),
        _gate(
            "attack AUC 95% CI upper bound",
            "auc_ci_high",
            "<=",
            gates.max_attack_auc_ci_high,
            [(w, a.get("auc_ci_high")) for w, a in zip(where, pooled, strict=True)],
        ),
        # At 1% FPR a few held-out patients decide the figure, and the release's noise is of the
        # same size: the point estimate alone would fail a chance-level attack often (README), so
        # the gate asks that the TPR is not significantly above the threshold.
        _gate(
            "attack TPR at 1% FPR (interval lower bound)",
            "tpr_at_1pct_fpr_ci_low",
            "<=",
            gates.max_tpr_at_1pct_fpr,
            [(w, a.get("tpr_at_1pct_fpr_ci_low")) for w, a in zip(where, pooled, strict=True)],
        ),
        _gate(
            "DCR overfitting protection",
            "score",
            ">=",
            gates.min_dcr_protection,
            [(str(d.get("hospital", "?")), d.get("score")) for d in _pooled(dcr)],
        ),
        _gate(
            "no hospital significantly above the AUC gate",
            "auc_ci_low",
            "<=",
            gates.max_attack_auc,
            [(f"{a.get('hospital', '?')} / {a.get('name', '?')}", a.get("auc_ci_low")) for a in per_hospital],
        ),
    ]
