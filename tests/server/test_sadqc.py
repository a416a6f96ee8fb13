"""Tests for server.sadqc: quality scores, the anomaly filter, and the controller's decision rules."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from configs.schema import load_schema
from models.encoder import TabularEncoder
from models.pairs import pair_counts
from models.statistics import histogram_counts
from server.sadqc import (
    IFOREST_REASON,
    SADQC,
    SCORE_WEIGHTS,
    QualityScores,
    SADQCConfig,
    constraint_violations,
    filter_anomalies,
    overall_score,
    score_sample,
)
from simulation.cohort import generate_demo_cohort

SCHEMA = load_schema()


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict]:
    real = generate_demo_cohort(3000, seed=0).static
    return histogram_counts(real, SCHEMA), pair_counts(real, SCHEMA)


@pytest.fixture(scope="module")
def synthetic() -> pd.DataFrame:
    """Stand-in for a good generator: a fresh sample of the same population."""
    return generate_demo_cohort(1500, seed=11).static.drop(columns=["patient_id"]).reset_index(drop=True)


def _scores(overall: float) -> QualityScores:
    return QualityScores(
        column_shape=overall, pair_trends=overall, violations_rate=0.0, overall=overall, n_rows=10
    )


# ---------------------------------------------------------------- scores
def test_good_sample_scores_high_and_shuffled_pairs_score_lower(reference, synthetic) -> None:
    histograms, pairs = reference
    good = score_sample(synthetic, histograms, pairs, SCHEMA)
    assert good.violations_rate == 0.0 and good.violations == {}
    assert good.column_shape > 0.95 and good.pair_trends > 0.93 and good.overall > 0.95
    assert good.overall == pytest.approx(overall_score(good.column_shape, good.pair_trends, 0.0))
    assert len(good.per_column) == 9 and len(good.per_pair) == 36

    rng = np.random.default_rng(3)
    shuffled = synthetic.copy()
    for name in SCHEMA.column_names:
        shuffled[name] = rng.permutation(shuffled[name].to_numpy())
    broken = score_sample(shuffled, histograms, pairs, SCHEMA)
    assert broken.column_shape == pytest.approx(good.column_shape)  # same marginals
    assert broken.pair_trends < good.pair_trends - 0.07
    assert broken.overall < good.overall


def test_overall_is_the_documented_weighted_mean() -> None:
    assert sum(SCORE_WEIGHTS.values()) == pytest.approx(1.0)
    assert overall_score(1.0, 1.0, 0.0) == pytest.approx(1.0)
    assert overall_score(0.8, 0.6, 0.5) == pytest.approx(0.4 * 0.8 + 0.4 * 0.6 + 0.2 * 0.5)


def test_constraint_violations_name_every_broken_rule(synthetic) -> None:
    frame = synthetic.head(10).copy()
    frame["dass_stress"] = frame["dass_stress"].astype(float)
    frame["bmi"] = frame["bmi"].astype(object)
    frame.loc[0, "age"] = 150  # above max
    frame.loc[1, "age"] = 3  # below min
    frame.loc[2, "gender"] = "robot"
    frame.loc[3, "dass_stress"] = 3.5  # not an integer
    frame.loc[4, "bmi"] = None
    frame.loc[5, "bmi"] = "heavy"
    frame.loc[6, "age"] = 200  # two rules broken in one row
    frame.loc[6, "gender"] = "robot"
    mask, counts = constraint_violations(frame, SCHEMA)
    assert counts == {
        "age:below_min": 1,
        "age:above_max": 2,
        "gender:unknown_category": 2,
        "bmi:missing": 1,
        "bmi:not_numeric": 1,
        "dass_stress:not_integer": 1,
    }
    assert mask.tolist() == [True] * 7 + [False] * 3


def test_violations_enter_the_score(reference, synthetic) -> None:
    histograms, pairs = reference
    frame = synthetic.copy()
    frame.loc[:29, "age"] = 120  # 30 of 1500 rows = 2%
    scores = score_sample(frame, histograms, pairs, SCHEMA)
    assert scores.violations_rate == pytest.approx(0.02)
    assert scores.violations == {"age:above_max": 30}
    assert scores.overall == pytest.approx(overall_score(scores.column_shape, scores.pair_trends, 0.02))


# ---------------------------------------------------------------- anomaly filter
@pytest.fixture(scope="module")
def encoder(reference) -> TabularEncoder:
    return TabularEncoder.from_histograms(SCHEMA, reference[0])


def test_filter_removes_injected_rows_and_counts_reasons(synthetic, encoder) -> None:
    frame = synthetic.copy()
    frame["dass_anxiety"] = frame["dass_anxiety"].astype(float)
    frame.loc[0:4, "age"] = 140
    frame.loc[5:7, "bmi"] = 75.0
    frame.loc[8:9, "dass_anxiety"] = 7.25
    frame.loc[10, "age"] = 10  # below min *and* above max elsewhere: first rule (age) names it
    frame.loc[10, "bmi"] = 99.0
    injected = set(range(11))
    # Rows of a valid but very unusual profile, for the isolation forest.
    odd = pd.DataFrame(
        {
            "age": [19] * 8,
            "gender": ["nonbinary"] * 8,
            "occupation": ["retired"] * 8,
            "marital_status": ["widowed"] * 8,
            "bmi": [49.5] * 8,
            "dass_depression": [42] * 8,
            "dass_anxiety": [0.0] * 8,
            "dass_stress": [42] * 8,
            "risk_level": ["low"] * 8,
        }
    )
    frame = pd.concat([frame, odd], ignore_index=True)
    odd_rows = set(range(len(synthetic), len(frame)))

    kept, removed = filter_anomalies(
        frame, encoder.transform(frame), schema=SCHEMA, contamination=0.01, seed=0
    )
    assert removed["age:above_max"] == 5
    assert removed["bmi:above_max"] == 3
    assert removed["dass_anxiety:not_integer"] == 2
    assert removed["age:below_min"] == 1
    assert sum(removed.values()) == len(frame) - len(kept)
    assert not injected & set(kept.index)
    assert not odd_rows & set(kept.index), "isolation forest missed the implausible profiles"
    # contamination is the share of constraint-valid rows the forest removes
    valid = len(frame) - len(injected)
    assert removed[IFOREST_REASON] == pytest.approx(0.01 * valid, abs=3)
    assert constraint_violations(kept, SCHEMA)[1] == {}

    again = filter_anomalies(frame, encoder.transform(frame), schema=SCHEMA, contamination=0.01, seed=0)
    assert again[1] == removed and again[0].index.equals(kept.index)


def test_filter_without_forest_only_applies_constraints(synthetic, encoder) -> None:
    frame = synthetic.head(200).copy()
    frame.loc[0, "gender"] = "robot"
    encoded = np.zeros((len(frame), encoder.width))
    kept, removed = filter_anomalies(frame, encoded, schema=SCHEMA, contamination=0.0, seed=0)
    assert removed == {"gender:unknown_category": 1, IFOREST_REASON: 0}
    assert len(kept) == 199

    encoded[5] = np.nan
    _, removed = filter_anomalies(frame, encoded, schema=SCHEMA, contamination=0.0, seed=0)
    assert removed["encoding:not_finite"] == 1


def test_filter_checks_its_inputs(synthetic, encoder) -> None:
    frame = synthetic.head(50)
    with pytest.raises(ValueError, match="one row per frame row"):
        filter_anomalies(frame, np.zeros((49, encoder.width)), schema=SCHEMA)
    with pytest.raises(ValueError, match="contamination"):
        filter_anomalies(frame, np.zeros((50, encoder.width)), schema=SCHEMA, contamination=0.7)


# ---------------------------------------------------------------- controller rules
def test_accept_keep_rollback_with_numbers() -> None:
    sadqc = SADQC(stage="generator")
    first = sadqc.observe_round(1, _scores(0.70))
    assert first.action == "accept" and first.new_best and "0.7000" in first.reason
    assert sadqc.best_round == 1 and sadqc.threshold == pytest.approx(0.05)

    better = sadqc.observe_round(2, _scores(0.80))
    assert better.action == "accept" and better.best_round == 2
    assert "beats the best 0.7000" in better.reason and "by 0.1000" in better.reason

    within = sadqc.observe_round(3, _scores(0.76))  # 0.04 below, threshold 0.05
    assert within.action == "keep" and not within.restore_best
    assert "0.0400 below the best 0.8000" in within.reason and "within the threshold 0.0500" in within.reason
    assert within.adjustments == {}

    worse = sadqc.observe_round(4, _scores(0.74))  # 0.06 below
    assert worse.action == "rollback" and worse.restore_best
    assert "beyond the threshold 0.0500" in worse.reason and "restoring round 2" in worse.reason
    assert worse.adjustments["lr_multiplier"] == 0.5
    assert sadqc.best_round == 2 and sadqc.best_score == pytest.approx(0.80)
    assert [d.round for d in sadqc.history] == [1, 2, 3, 4]


def test_threshold_tightens_as_quality_improves_and_never_loosens() -> None:
    cfg = SADQCConfig()
    sadqc = SADQC(cfg)
    thresholds = []
    for i, score in enumerate([0.60, 0.85, 0.90, 0.95, 0.97, 0.80, 0.99], start=1):
        decision = sadqc.observe_round(i, _scores(score))
        thresholds.append(decision.next_threshold)
    assert thresholds[0] == pytest.approx(0.05)  # 0.25 * 0.40 capped at the initial 0.05
    assert thresholds[1] == pytest.approx(0.0375)  # 0.25 * (1 - 0.85)
    assert thresholds[2] == pytest.approx(0.025)
    assert thresholds[3] == pytest.approx(0.0125)
    assert thresholds[4] == pytest.approx(0.01)  # floored at min_threshold
    assert thresholds[6] == pytest.approx(0.01)
    assert all(b <= a for a, b in itertools.pairwise(thresholds))
    assert "threshold tightened from 0.0375 to 0.0250" in sadqc.history[2].reason
    # With a tight threshold, a drop that an early round would have tolerated rolls back.
    assert sadqc.history[5].action == "rollback"


def test_adjustments_are_bounded() -> None:
    cfg = SADQCConfig(patience=2, max_extra_local_epochs=2, lr_decay=0.5, min_lr_multiplier=0.125)
    sadqc = SADQC(cfg)
    sadqc.observe_round(1, _scores(0.9))
    for r in range(2, 12):
        decision = sadqc.observe_round(r, _scores(0.5))
        assert decision.action == "rollback"
    assert sadqc.training_overrides() == {"lr_multiplier": 0.125, "extra_local_epochs": 2}
    lr_steps = [d.adjustments["lr_multiplier"] for d in sadqc.history if "lr_multiplier" in d.adjustments]
    assert lr_steps == [0.5, 0.25, 0.125]
    epoch_steps = [
        d.adjustments["extra_local_epochs"] for d in sadqc.history if "extra_local_epochs" in d.adjustments
    ]
    assert epoch_steps == [1, 2] and all(isinstance(v, int) for v in epoch_steps)
    assert "already at its floor 0.125" in sadqc.history[-1].reason


def test_patience_adds_local_epochs_after_non_improving_keeps() -> None:
    sadqc = SADQC(SADQCConfig(patience=3))
    sadqc.observe_round(1, _scores(0.8))
    assert sadqc.observe_round(2, _scores(0.79)).adjustments == {}
    assert sadqc.observe_round(3, _scores(0.80)).adjustments == {}  # equal is not better
    third = sadqc.observe_round(4, _scores(0.79))
    assert third.action == "keep" and third.adjustments == {"extra_local_epochs": 1}
    assert "3 rounds without improvement" in third.reason
    assert sadqc.observe_round(5, _scores(0.81)).action == "accept"  # counter reset
    assert sadqc.training_overrides() == {"lr_multiplier": 1.0, "extra_local_epochs": 1}


def test_non_finite_score_rolls_back() -> None:
    sadqc = SADQC()
    sadqc.observe_round(1, _scores(0.8))
    decision = sadqc.observe_round(2, _scores(float("nan")))
    assert decision.action == "rollback" and decision.scores is None
    assert "not finite" in decision.reason
    json.dumps(sadqc.state_dict(), allow_nan=False)


def test_state_round_trip_resumes_identically() -> None:
    scores = [0.7, 0.8, 0.78, 0.6, 0.82, 0.81, 0.5, 0.83]
    straight = SADQC(SADQCConfig(patience=2), stage="tabular")
    for r, s in enumerate(scores, start=1):
        straight.observe_round(r, _scores(s))

    resumed = SADQC(SADQCConfig(patience=2), stage="tabular")
    for r, s in enumerate(scores[:4], start=1):
        resumed.observe_round(r, _scores(s))
    text = json.dumps(resumed.state_dict(), allow_nan=False)  # what a checkpoint stores
    resumed = SADQC.from_state(json.loads(text))
    for r, s in enumerate(scores[4:], start=5):
        resumed.observe_round(r, _scores(s))

    assert resumed.state_dict() == straight.state_dict()
    assert resumed.decisions() == straight.decisions()
    with pytest.raises(ValueError, match="version"):
        SADQC.from_state({**straight.state_dict(), "version": 99})


def test_record_filter_logs_counts() -> None:
    sadqc = SADQC()
    sadqc.observe_round(1, _scores(0.9))
    decision = sadqc.record_filter(1, n_before=1000, removed={"age:above_max": 2, IFOREST_REASON: 10})
    assert decision.action == "filter" and decision.removed == {"age:above_max": 2, IFOREST_REASON: 10}
    assert "removed 12 of 1000 rows" in decision.reason and "1.20%" in decision.reason
    assert sadqc.history[-1] is decision
    assert math.isclose(sadqc.best_score or 0.0, 0.9)


def test_config_rejects_inconsistent_thresholds() -> None:
    with pytest.raises(ValueError):
        SADQCConfig(initial_threshold=0.01, min_threshold=0.05)


def test_non_finite_first_round_restores_the_initial_weights() -> None:
    sadqc = SADQC()
    decision = sadqc.observe_round(1, _scores(float("inf")))
    assert decision.action == "rollback" and decision.best_round is None
    assert "restoring the initial weights" in decision.reason
    assert sadqc.observe_round(2, _scores(0.7)).action == "accept"
