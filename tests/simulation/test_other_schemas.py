"""Any schema end to end: a sleep clinic (14 nights of 3 channels), and without its sequence."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from configs.errors import ConfigError
from configs.schema import CohortSchema, load_schema
from configs.settings import load_settings
from mindfed.cli import app
from models.bundle import load_bundle
from server import report_risk
from simulation.runner import DEMO_CHECK_SKIPPED, SimulationOutcome, simulate
from tests.support.other_cohort import (
    OTHER_SCHEMA_PATH,
    other_schema,
    sleep_clinic_cohort,
    static_only_schema_file,
    write_hospitals,
)
from tests.support.runs import TINY

# The default plan (pgm, TimeGAN, one federated risk round, synthetic-route risk models) at TINY's
# sizes: TINY's own first stage is dp-ctgan, so its dp-ctgan keys are left out.
OTHER_TINY: dict[str, Any] = {
    **{k: v for k, v in TINY.items() if not k.startswith(("stages.0.", "model.dp-ctgan."))},
    "model.pgm.iterations": 200,  # mirror descent on a tiny cohort: 1500 steps only cost seconds
}
PATIENTS = TINY["federation.patients"]


def _demo_names() -> set[str]:
    """Every name the demo schema gives a column, channel, id or day column, bar two plain words."""
    # The report uses these two for its own things: DP-SGD "steps" in the ledger, "day by day" moments.
    demo = load_schema()
    assert demo.sequence is not None
    names = {demo.id_column, *demo.column_names, demo.sequence.day_column}
    names |= {c.name for c in demo.sequence.channels}
    return names - {"steps", "day"}


def _words(path: Path) -> set[str]:
    """The word-like tokens of a text file, images and all (a name inside a PNG is not seen)."""
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", path.read_text(encoding="utf-8")))


def _run(tmp: Path, schema_path: Path, *, with_sequence: bool, extra: dict[str, Any]) -> SimulationOutcome:
    cohort = sleep_clinic_cohort(PATIENTS, seed=3)
    write_hospitals(cohort, tmp / "cohort", hospitals=2, with_sequence=with_sequence)
    overrides = {**OTHER_TINY, "schema": str(schema_path), **extra}
    return simulate(config=None, overrides=overrides, out_dir=tmp / "out", cohort_dir=tmp / "cohort")


@pytest.fixture(scope="module")
def sleep_run(tmp_path_factory: pytest.TempPathFactory) -> SimulationOutcome:
    """The sleep clinic with its 14 nights: one run for the module."""
    return _run(tmp_path_factory.mktemp("sleep"), OTHER_SCHEMA_PATH, with_sequence=True, extra={})


@pytest.fixture(scope="module")
def static_run(tmp_path_factory: pytest.TempPathFactory) -> SimulationOutcome:
    """The same clinic's profiles alone, its schema without [sequence]: one run for the module."""
    tmp = tmp_path_factory.mktemp("sleep-static")
    # no TimeGAN stage: the static generator gets the share TimeGAN would have had
    extra = {"stages.timegan": False, "stages.0.epsilon_share": 0.61}
    return _run(tmp, static_only_schema_file(tmp), with_sequence=False, extra=extra)


def _reads_the_sequence(out: Path) -> dict[str, bool]:
    """Each exported risk model (by bundle folder): whether it reads the sequence or the profile only."""
    folders = sorted(p for p in (out / "bundle" / "risk").iterdir() if p.is_dir())
    return {folder.name: bool(load_bundle(folder)[0].uses_week) for folder in folders}


def _check_release(outcome: SimulationOutcome, schema: CohortSchema) -> None:
    """What both runs share: hospitals, gates evaluated, the report in the schema's names, risk models."""
    out, metrics = outcome.out_dir, outcome.metrics
    assert {h["hospital"] for h in metrics["hospitals"]} == {"hospital-1", "hospital-2"}
    assert metrics["handshake_refusals"] == []
    assert all(r["aggregated"] and not r["rejected"] for r in metrics["rounds"])
    # the audit was answered: every gate has a value, none is a "no results" failure
    gates = metrics["audit"]["gates"]
    assert len(gates) == 5
    for gate in gates:
        assert gate["value"] is not None and "no results" not in str(gate["worst"]), gate
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert all(g["value"] is not None for g in report["gates"]["results"])
    assert {a["hospital"] for a in report["privacy"]["attacks"]} >= {"hospital-1", "hospital-2"}
    assert list(report["quality"]["marginals"]) == schema.column_names
    # the page names this schema's columns and the label's flagged class, and no demo name
    words = _words(out / "report.html")
    assert set(schema.column_names) <= words
    assert "severity = severe" in (out / "report.html").read_text(encoding="utf-8")
    assert not words & _demo_names(), words & _demo_names()
    assert not _words(out / "report.json") & _demo_names()
    synthetic = pd.read_csv(out / "synthetic" / "static.csv")
    assert list(synthetic.columns) == [schema.id_column, *schema.column_names]
    assert set(synthetic["severity"]) <= {"minimal", "mild", "marked", "severe"}
    # the federated risk round and both synthetic-route models trained, and the hospitals scored each
    routes = {(r["model"], r["route"]) for r in metrics["risk_models"]}
    assert routes == {("hybrid-lstm", "federated-dp"), ("hybrid-lstm", "synthetic"), ("gbm", "synthetic")}
    evaluated = [r for r in metrics["risk_evaluation"]["rows"] if r["hospital"] == "all hospitals"]
    assert {(r["model"], r["route"]) for r in evaluated} == routes
    assert all(0.0 <= r["macro_f1"] <= 1.0 for r in evaluated)
    # no demo cohort here: the simulation-only check says why it did not run
    assert metrics["demo_check"] == {"skipped": DEMO_CHECK_SKIPPED}


@pytest.mark.integration
def test_a_second_schema_with_14_nights_of_3_channels_runs_end_to_end(sleep_run: SimulationOutcome) -> None:
    schema = other_schema()
    assert schema.sequence is not None
    _check_release(sleep_run, schema)
    out = sleep_run.out_dir
    synthetic = pd.read_csv(out / "synthetic" / "static.csv")
    nights = pd.read_csv(out / "synthetic" / "timeseries.csv")
    channels = [c.name for c in schema.sequence.channels]
    assert list(nights.columns) == ["subject", "night", *channels]
    per_subject = nights.groupby("subject")["night"].agg(["count", "min", "max", "nunique"])
    assert set(per_subject.index) == set(synthetic["subject"])
    assert (per_subject == [14, 1, 14, 14]).all().all()
    for channel in schema.sequence.channels:  # inside the declared public ranges
        assert nights[channel.name].between(channel.min, channel.max).all()
    stages = [r["stage"] for r in sleep_run.metrics["rounds"]]
    assert stages == ["timegan embedding", "timegan supervised", "timegan joint", "hybrid-lstm"]
    assert (out / "bundle" / "sequence" / "model_card.json").is_file()
    # every risk model of both routes reads the nights beside the profile
    assert set(_reads_the_sequence(out).values()) == {True}


@pytest.mark.integration
def test_the_schema_without_its_sequence_runs_end_to_end(static_run: SimulationOutcome) -> None:
    schema = other_schema(with_sequence=False)
    _check_release(static_run, schema)
    out = static_run.out_dir
    assert not (out / "synthetic" / "timeseries.csv").exists()
    assert not (out / "bundle" / "sequence").exists()
    assert [r["stage"] for r in static_run.metrics["rounds"]] == ["hybrid-lstm"]
    ledger = static_run.metrics["ledger"][0]["entries"]
    assert not any("sequence" in entry["what"] for entry in ledger)  # no moments were released
    # the plan's use_week models fall back to their profile-only variants
    assert set(_reads_the_sequence(out).values()) == {False}


def test_the_demo_cohort_is_refused_for_another_schema_with_the_way_out(tmp_path: Path) -> None:
    overrides = {**OTHER_TINY, "schema": str(OTHER_SCHEMA_PATH)}
    with pytest.raises(ConfigError, match=r"declares others: give your hospitals' folders .*--cohort"):
        simulate(config=None, overrides=overrides, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "cohort").exists()


def test_a_sequence_stage_is_refused_at_load_for_a_schema_without_a_sequence(tmp_path: Path) -> None:
    # before: every hospital refused the handshake ("sequence moments were asked for"), after Ray
    schema = static_only_schema_file(tmp_path)
    with pytest.raises(ConfigError, match=r"stage 'timegan' .* no \[sequence\]: .*stages\.timegan=false"):
        load_settings(None, {"schema": str(schema)})
    settings = load_settings(None, {"schema": str(schema), "stages.timegan": False})
    assert [stage.model for stage in settings.stages] == ["pgm", "hybrid-lstm", "transformer"]


def test_the_cli_refuses_the_demo_cohort_for_another_schema(tmp_path: Path) -> None:
    (tmp_path / "clinic.toml").write_text(OTHER_SCHEMA_PATH.read_text(encoding="utf-8"), encoding="utf-8")
    config = tmp_path / "settings.toml"
    config.write_text('schema = "clinic.toml"\n', encoding="utf-8")  # relative to the settings file
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "clinic.toml declares others" in text and "--cohort FOLDER" in text
    assert "Traceback" not in result.output and not out.exists()


def test_the_risk_section_names_the_labels_flagged_class(monkeypatch: pytest.MonkeyPatch) -> None:
    titles: list[str] = []

    def titles_only(draw: Any, size: tuple[float, float]) -> str:
        from matplotlib.figure import Figure

        figure = Figure(figsize=size)
        draw(figure)
        titles.extend(ax.get_title() for ax in figure.axes)
        return ""

    monkeypatch.setattr(report_risk, "png_of", titles_only)
    classes = ("minimal", "mild", "marked", "severe")
    row = {
        "model": "gbm",
        "route": "synthetic",
        "hospital": "all hospitals",
        **dict.fromkeys(("high_risk_auroc", "macro_f1", "high_risk_f1", "accuracy"), 0.5),
        "high_risk_recall_at_90_precision": 0.1,
        "patients": 40.0,
        "noise_sd": 2.0,
        "roc_fpr": [0.0, 1.0],
        "roc_tpr": [0.0, 1.0],
        "calibration_forecast": [0.25, 0.75],
        "calibration_observed": [0.2, None],
        "confusion": [[1.0] * 4] * 4,
    }
    page = report_risk.risk_section({"rows": [row]}, classes, "severity")
    assert "severe vs the rest" in titles and not any("high" in t for t in titles)
    assert "the last category of the label: severity = severe" in page
