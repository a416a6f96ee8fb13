"""The command line: clear messages and exit code 2 on bad input, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mindfed.cli import app
from simulation.cohort import generate_demo_cohort, write_cohort_folder

runner = CliRunner()


@pytest.fixture
def cohort_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "hospital"
    write_cohort_folder(generate_demo_cohort(60, seed=3), folder)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_check_accepts_a_valid_folder(cohort_folder: Path) -> None:
    result = runner.invoke(app, ["check", "--data", str(cohort_folder)])
    assert result.exit_code == 0, result.output
    assert "60 patients" in result.output


def _drop_column(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["dass_anxiety"])


def _text_in_number(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.astype({"bmi": object})
    frame.loc[2, "bmi"] = "twenty"
    return frame


def _out_of_range(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[7, "age"] = 130
    return frame


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (_drop_column, "column 'dass_anxiety': required column is missing"),
        (_text_in_number, "line 4, column 'bmi': 'twenty' is not a number"),
        (_out_of_range, "line 9, column 'age': 130 is outside [18, 90]"),
    ],
)
def test_check_names_the_problem_and_writes_nothing(cohort_folder: Path, corrupt, expected: str) -> None:
    static = cohort_folder / "static.csv"
    corrupt(pd.read_csv(static)).to_csv(static, index=False)
    before = _snapshot(cohort_folder.parent)

    result = runner.invoke(app, ["check", "--data", str(cohort_folder)])

    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert _snapshot(cohort_folder.parent) == before


def test_check_reports_an_empty_file(cohort_folder: Path) -> None:
    (cohort_folder / "timeseries.csv").write_bytes(b"")
    result = runner.invoke(app, ["check", "--data", str(cohort_folder)])
    assert result.exit_code == 2
    assert "timeseries.csv: file is empty" in result.output


@pytest.mark.integration
def test_simulate_with_every_hospital_invalid_stops_with_one_message(
    cohort_folder: Path, tmp_path: Path
) -> None:
    parent = tmp_path / "federation"
    (parent / "only-hospital").mkdir(parents=True)
    static = pd.read_csv(cohort_folder / "static.csv")
    _out_of_range(static).to_csv(parent / "only-hospital" / "static.csv", index=False)
    (parent / "only-hospital" / "timeseries.csv").write_bytes((cohort_folder / "timeseries.csv").read_bytes())
    out = tmp_path / "out"

    result = runner.invoke(app, ["simulate", "--cohort", str(parent), "--out", str(out)])

    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    # the server's message names line, column and problem class; the value stays in the node's log
    assert "no hospital passed the handshake" in text and "line 9, column 'age': out of range" in text
    assert not (out / "metrics.json").exists() and not (out / "bundle").exists()


def test_bad_config_value_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[federation]\nlocal_epochs = 0\n", encoding="utf-8")
    result = runner.invoke(app, ["simulate", "--config", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "federation.local_epochs" in result.output
    assert not (tmp_path / "o").exists()
