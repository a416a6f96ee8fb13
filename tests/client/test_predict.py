"""`mindfed predict`: an exported risk model on a folder of patients, all or nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from client.data import CohortValidationError
from client.predict import predict_folder
from configs.schema import load_schema
from mindfed.cli import app
from models.bundle import BundleError, save_bundle
from models.encoder import TabularEncoder
from models.registry import get_model_class
from models.risk.features import encode_patients
from models.statistics import histogram_counts
from simulation.cohort import generate_demo_cohort, write_cohort_folder
from tests.support.csv_cells import set_cell

CLASSES = ["low", "moderate", "high"]


@pytest.fixture(scope="module")
def risk_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small gbm trained on demo patients, exported as a run exports it."""
    schema = load_schema()
    train = generate_demo_cohort(800, seed=31)
    encoder = TabularEncoder.from_histograms(schema, histogram_counts(train.static, schema))
    model = get_model_class("gbm")(encoder, {"max_iter": 60}, seed=0)
    model.fit_offline(
        encode_patients(encoder, train.static, train.timeseries), seed=0, device=torch.device("cpu")
    )
    folder = tmp_path_factory.mktemp("bundle") / "gbm-on-synthetic"
    save_bundle(folder, model=model, card={"route": "synthetic"})
    return folder


@pytest.fixture
def patients(tmp_path: Path) -> Path:
    folder = tmp_path / "patients"
    write_cohort_folder(generate_demo_cohort(300, seed=99), folder)
    return folder


def test_predictions_have_an_id_a_class_and_a_probability_per_class(
    risk_bundle: Path, patients: Path, tmp_path: Path
) -> None:
    out = tmp_path / "predictions.csv"
    done = predict_folder(risk_bundle, patients, out)
    frame = pd.read_csv(out)
    assert done.patients == len(frame) == 300
    assert list(frame.columns) == ["patient_id", "predicted_risk_level", *[f"p_{c}" for c in CLASSES]]
    np.testing.assert_allclose(frame[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-6)
    truth = (
        pd.read_csv(patients / "static.csv").set_index("patient_id").loc[frame["patient_id"], "risk_level"]
    )
    auroc = roc_auc_score(truth.map(CLASSES.index), frame[[f"p_{c}" for c in CLASSES]], multi_class="ovr")
    assert auroc > 0.85


def test_patients_without_a_label_are_predicted_the_same(
    risk_bundle: Path, patients: Path, tmp_path: Path
) -> None:
    predict_folder(risk_bundle, patients, tmp_path / "with.csv")
    static = pd.read_csv(patients / "static.csv")
    static.drop(columns="risk_level").to_csv(patients / "static.csv", index=False)
    predict_folder(risk_bundle, patients, tmp_path / "without.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "with.csv"), pd.read_csv(tmp_path / "without.csv"))


def test_a_bad_cell_is_named_and_nothing_is_written(
    risk_bundle: Path, patients: Path, tmp_path: Path
) -> None:
    set_cell(patients / "static.csv", 12, "dass_anxiety", "lots")
    out = tmp_path / "predictions.csv"
    out.write_text("an earlier file\n", encoding="utf-8")
    with pytest.raises(CohortValidationError) as caught:
        predict_folder(risk_bundle, patients, out)
    message = str(caught.value)
    assert "static.csv" in message and "12" in message and "dass_anxiety" in message
    assert out.read_text(encoding="utf-8") == "an earlier file\n"  # not touched


def test_a_generator_bundle_is_not_a_risk_model(tmp_path: Path, patients: Path) -> None:
    schema = load_schema()
    static = generate_demo_cohort(200, seed=3).static
    encoder = TabularEncoder.from_histograms(schema, histogram_counts(static, schema))
    save_bundle(tmp_path / "gen", model=get_model_class("dp-ctgan")(encoder, {}, seed=0), card={})
    with pytest.raises(BundleError, match="not a risk model"):
        predict_folder(tmp_path / "gen", patients, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_the_command_line_reports_a_bad_folder_and_exits_2(
    risk_bundle: Path, patients: Path, tmp_path: Path
) -> None:
    set_cell(patients / "timeseries.csv", 5, "sleep_hours", "-3")
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(
        app, ["predict", "--model", str(risk_bundle), "--data", str(patients), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "timeseries.csv" in result.output and "sleep_hours" in result.output
    assert not out.exists()
    ok = CliRunner().invoke(
        app, ["predict", "--model", str(risk_bundle), "--data", str(tmp_path / "nope"), "--out", str(out)]
    )
    assert ok.exit_code == 2 and not out.exists()
