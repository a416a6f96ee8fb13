"""The command line: clear messages and exit code 2 on bad input, and nothing written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner, Result

from configs.schema import load_schema
from mindfed.cli import app
from simulation.cohort import generate_demo_cohort, write_cohort_folder
from tests.support.schema_fill import fill_placeholders

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


def _init(folder: Path, out: Path, *extra: str) -> Result:
    arguments = ["init", "--from", str(folder / "static.csv"), "--timeseries", str(folder / "timeseries.csv")]
    return runner.invoke(app, [*arguments, "--out", str(out), *extra])


def test_init_drafts_a_schema_that_check_accepts_once_filled(cohort_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "schema.toml"
    result = _init(cohort_folder, out)
    assert result.exit_code == 0, result.output
    assert "replace every FILL ME with public knowledge" in " ".join(result.output.split())

    drafted = runner.invoke(app, ["check", "--data", str(cohort_folder), "--schema", str(out)])
    assert drafted.exit_code == 2
    assert "column 'age': min is a placeholder, still to fill" in " ".join(drafted.output.split())
    assert "Traceback" not in drafted.output

    out.write_text(fill_placeholders(out.read_text(encoding="utf-8"), load_schema()), encoding="utf-8")
    filled = runner.invoke(app, ["check", "--data", str(cohort_folder), "--schema", str(out)])
    assert filled.exit_code == 0, filled.output
    assert "60 patients" in filled.output


def test_init_overwrites_only_with_force(cohort_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "schema.toml"
    out.write_text("# mine\n", encoding="utf-8")
    result = _init(cohort_folder, out)
    assert result.exit_code == 2
    assert "exists; give --force to overwrite it" in " ".join(result.output.split())
    assert out.read_text(encoding="utf-8") == "# mine\n"
    assert _init(cohort_folder, out, "--force").exit_code == 0
    assert "FILL ME" in out.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_init_names_a_semicolon_file_and_writes_nothing(cohort_folder: Path, tmp_path: Path) -> None:
    static = cohort_folder / "static.csv"
    pd.read_csv(static).to_csv(static, sep=";", index=False)
    out = tmp_path / "schema.toml"
    result = _init(cohort_folder, out)
    assert result.exit_code == 2
    assert "static.csv, line 1, column 'patient_id;age;" in " ".join(result.output.split())
    assert "looks semicolon-separated" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists()


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


# ---------------------------------------------------------------- evaluate / compare
@pytest.fixture
def tables(tmp_path: Path) -> Path:
    """A real cohort folder, a holdout CSV of other patients, a fresh draw and a shuffled one."""
    write_cohort_folder(generate_demo_cohort(200, seed=11), tmp_path / "real")
    holdout = generate_demo_cohort(120, seed=12).static
    holdout.assign(patient_id="H" + holdout["patient_id"]).to_csv(tmp_path / "holdout.csv", index=False)
    fresh = generate_demo_cohort(200, seed=13).static
    fresh.to_csv(tmp_path / "fresh.csv", index=False)
    rng = np.random.default_rng(0)
    shuffled = fresh.assign(**{c: rng.permutation(fresh[c].to_numpy()) for c in fresh.columns[1:]})
    shuffled.to_csv(tmp_path / "shuffled.csv", index=False)
    return tmp_path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """HistGradientBoosting's OpenMP threads crawl on a busy 2-core machine; one thread does not."""
    with threadpool_limits(1):
        yield


def _report(folder: Path) -> dict:
    assert (folder / "report.html").is_file()
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def test_compare_scores_every_table_side_by_side(tables: Path, one_thread: None) -> None:
    out = tables / "report"
    result = runner.invoke(
        app,
        ["compare", "--real", str(tables / "real"), "--synthetic", str(tables / "fresh.csv"),
         str(tables / "shuffled.csv"), "--names", "fresh draw", "broken", "--holdout",
         str(tables / "holdout.csv"), "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "synthetic vs" in text and "fresh" in text and "broken" in text and "report.html" in text
    fresh, broken = _report(out)["tables"]
    assert (fresh["name"], broken["name"]) == ("fresh draw", "broken")
    assert fresh["quality"]["column_pair_trends"] > broken["quality"]["column_pair_trends"]
    assert fresh["tstr"]["auroc"] > broken["tstr"]["auroc"] + 0.2
    assert len(fresh["attacks"]) == 3 and fresh["dcr"]["score"] > 0.5


def test_evaluate_is_compare_with_one_table(tables: Path, one_thread: None) -> None:
    given = ["--real", str(tables / "real"), "--synthetic", str(tables / "fresh.csv")]
    result = runner.invoke(app, ["evaluate", *given, "--out", str(tables / "e")])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["compare", *given, "--out", str(tables / "c")])
    assert again.exit_code == 0, again.output
    evaluated, compared = _report(tables / "e"), _report(tables / "c")
    assert evaluated["holdout"] is None and [t["name"] for t in evaluated["tables"]] == ["fresh"]
    assert evaluated["tables"] == compared["tables"]
    assert evaluated["tables"][0]["dcr"] is None and evaluated["tables"][0]["attacks"] == []


def _latin1(folder: Path) -> list[str]:
    (folder / "fresh.csv").write_bytes((folder / "fresh.csv").read_bytes().replace(b"female", b"f\xe9male"))
    return ["--synthetic", str(folder / "fresh.csv")]


def _no_column(folder: Path) -> list[str]:
    pd.read_csv(folder / "fresh.csv").drop(columns="bmi").to_csv(folder / "fresh.csv", index=False)
    return ["--synthetic", str(folder / "fresh.csv")]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (lambda f: ["--synthetic", str(f / "absent.csv")], "absent.csv: no such file or folder"),
        (_no_column, "fresh.csv, line 1, column 'bmi': required column is missing"),
        (_latin1, "fresh.csv: not UTF-8 text (byte"),
        (lambda f: ["--synthetic", str(f / "fresh.csv"), str(f / "shuffled.csv"), "--names", "one"],
         "--names gives 1 name for 2 --synthetic tables"),
        (lambda f: ["--synthetic", str(f / "fresh.csv"), "--real", str(f / "nowhere")],
         "/nowhere: no such file or folder"),
    ],
    ids=["missing file", "missing column", "not UTF-8", "names count", "missing real"],
)  # fmt: skip
def test_compare_names_bad_input_and_writes_nothing(tables: Path, arguments, expected: str) -> None:
    extra = arguments(tables)
    before = _snapshot(tables)
    real = [] if "--real" in extra else ["--real", str(tables / "real")]
    result = runner.invoke(app, ["compare", *real, *extra, "--out", str(tables / "out")])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert _snapshot(tables) == before and not (tables / "out").exists()
