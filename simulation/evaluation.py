"""Synthetic data judged against real rows: SDMetrics quality and train-on-synthetic, test-on-real."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier

from configs.schema import CohortSchema
from models.risk.scores import risk_scores

# Fresh demo patients for train-on-synthetic / test-on-real (`mindfed cohort --patients 1000 --seed 99`).
TEST_PATIENTS, TEST_SEED = 1000, 99


def sdmetrics_metadata(schema: CohortSchema) -> dict[str, Any]:
    """SDMetrics' single-table metadata: categorical columns as such, the others numerical."""
    columns = {
        spec.name: {"sdtype": "categorical"} if spec.is_categorical else {"sdtype": "numerical"}
        for spec in schema.columns
    }
    return {"columns": columns}


def quality_report(real: pd.DataFrame, synthetic: pd.DataFrame, schema: CohortSchema) -> dict[str, Any]:
    """SDMetrics' QualityReport: column shapes, column pair trends, overall, and the pair trends per pair."""
    from sdmetrics.reports.single_table import QualityReport  # a heavy import, only when scoring

    names = schema.column_names
    report = QualityReport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report.generate(real[names], synthetic[names], sdmetrics_metadata(schema), verbose=False)
    properties = report.get_properties().set_index("Property")["Score"]
    pairs = report.get_details("Column Pair Trends")
    return {
        "column_shapes": float(properties["Column Shapes"]),
        "column_pair_trends": float(properties["Column Pair Trends"]),
        "overall": float(report.get_score()),
        "pair_trends": {
            f"{row['Column 1']}|{row['Column 2']}": float(row["Score"]) for _, row in pairs.iterrows()
        },
    }


def _features(frame: pd.DataFrame, schema: CohortSchema) -> pd.DataFrame:
    features = frame[[name for name in schema.column_names if name != schema.label_column]].copy()
    for spec in schema.columns:
        if spec.is_categorical and spec.name in features:
            features[spec.name] = pd.Categorical(features[spec.name], categories=list(spec.categories or ()))
    return features


def _scores(
    model: HistGradientBoostingClassifier, test: pd.DataFrame, schema: CohortSchema
) -> dict[str, float]:
    classes = list(schema.column(schema.label_column).categories or ())
    truth = pd.Categorical(test[schema.label_column], categories=classes).codes
    probabilities = np.zeros((len(test), len(classes)))
    probabilities[:, model.classes_] = model.predict_proba(_features(test, schema))
    return risk_scores(probabilities, np.asarray(truth, dtype=np.int64), len(classes))


def _fitted(train: pd.DataFrame, schema: CohortSchema, seed: int) -> HistGradientBoostingClassifier:
    classes = list(schema.column(schema.label_column).categories or ())
    model = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=seed)
    return model.fit(
        _features(train, schema), pd.Categorical(train[schema.label_column], categories=classes).codes
    )


def train_synthetic_test_real(
    synthetic: pd.DataFrame, real: pd.DataFrame, test: pd.DataFrame, schema: CohortSchema, *, seed: int = 0
) -> dict[str, Any]:
    """A gradient-boosting classifier of the label trained on synthetic rows, scored on real test
    patients, beside the same classifier trained on the real cohort (the ceiling)."""
    return {
        "synthetic": _scores(_fitted(synthetic, schema, seed), test, schema),
        "real": _scores(_fitted(real, schema, seed), test, schema),
        "test_patients": len(test),
    }
