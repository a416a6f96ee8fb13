"""`mindfed predict`: an exported risk model's class probabilities for a folder of patients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from client.data import load_cohort
from models.base import ModelKind
from models.bundle import BundleError, load_bundle
from models.risk.features import encode_patients
from privacy.storage import atomic_write_with

PROBABILITY_PREFIX = "p_"


@dataclass(frozen=True)
class Predictions:
    """What was written: how many patients, by which model, where."""

    patients: int
    model: str
    route: str
    out: Path


def predict_folder(model_dir: str | Path, data_dir: str | Path, out: str | Path) -> Predictions:
    """Validate `data_dir` against the bundle's schema (as `mindfed check` does, the label column
    may be absent), predict every patient, and write `out` whole or not at all: the id, the
    predicted class and one `p_<class>` column per class."""
    model, card = load_bundle(model_dir)
    if getattr(model, "kind", None) != ModelKind.RISK_MODEL:
        raise BundleError(f"{model_dir} holds a {card.get('model')!r} bundle, not a risk model's")
    schema = model.encoder.schema
    cohort = load_cohort(data_dir, schema, label_optional=True)
    probabilities = model.predict_proba(encode_patients(model.encoder, cohort.static, cohort.timeseries))
    frame = pd.DataFrame({schema.id_column: cohort.static[schema.id_column]})
    frame[f"predicted_{schema.label_column}"] = [model.classes[i] for i in probabilities.argmax(axis=1)]
    for index, name in enumerate(model.classes):
        frame[f"{PROBABILITY_PREFIX}{name}"] = probabilities[:, index]
    out = Path(out)
    atomic_write_with(out, lambda tmp: frame.to_csv(tmp, index=False))
    return Predictions(len(frame), str(card.get("model")), str(card.get("route", "")), out)
