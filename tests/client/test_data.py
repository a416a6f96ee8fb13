"""Tests for client.data: a cohort folder loads only when every cell fits the schema."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from client.data import (
    MAX_PROBLEM_CHARS,
    MAX_QUOTED_CHARS,
    MAX_REPORTED_ISSUES,
    PROBLEM_CLASSES,
    Cohort,
    CohortValidationError,
    ValidationIssue,
    clip,
    load_cohort,
    split_holdout,
)
from configs.schema import CohortSchema, load_schema
from mindfed.cli import app
from simulation.cohort import DemoCohort, generate_demo_cohort, write_cohort_folder
from tests.support.csv_cells import cell, lines_of, save_lines, set_cell

N_PATIENTS = 150
DAYS = 7


@pytest.fixture(scope="module")
def schema() -> CohortSchema:
    return load_schema()


@pytest.fixture(scope="module")
def demo() -> DemoCohort:
    return generate_demo_cohort(N_PATIENTS, seed=11, days=DAYS)


@pytest.fixture
def folder(tmp_path: Path, demo: DemoCohort) -> Path:
    path = tmp_path / "hospital-1"
    write_cohort_folder(demo, path)
    return path


# ---------------------------------------------------------------- CSV editing helpers
def _drop_column(path: Path, column: str) -> None:
    lines = lines_of(path)
    index = lines[0].split(",").index(column)
    save_lines(path, [",".join(c for i, c in enumerate(line.split(",")) if i != index) for line in lines])


def _load_error(folder: Path, schema: CohortSchema) -> CohortValidationError:
    with pytest.raises(CohortValidationError) as info:
        load_cohort(folder, schema)
    return info.value


# ---------------------------------------------------------------- a valid folder
def test_valid_folder_loads_with_counts_and_dtypes(
    folder: Path, schema: CohortSchema, demo: DemoCohort
) -> None:
    cohort = load_cohort(folder, schema)
    assert cohort.n_patients == N_PATIENTS
    assert list(cohort.static.columns) == [schema.id_column, *schema.column_names]
    for spec in schema.columns:
        dtype = cohort.static[spec.name].dtype
        if spec.kind == "integer":
            assert dtype == np.int64, spec.name
        elif spec.kind == "continuous":
            assert dtype == np.float64, spec.name
        else:
            assert pd.api.types.is_string_dtype(dtype), spec.name
            assert set(cohort.static[spec.name]) <= set(spec.categories or ())
    pd.testing.assert_frame_equal(
        cohort.static.reset_index(drop=True), demo.static.reset_index(drop=True), check_dtype=False
    )

    assert schema.sequence is not None
    ts = cohort.timeseries
    assert ts is not None
    assert len(ts) == N_PATIENTS * DAYS
    assert list(ts.columns) == [schema.id_column, "day", *(c.name for c in schema.sequence.channels)]
    for channel in schema.sequence.channels:
        assert ts[channel.name].dtype == np.float64
        assert ts[channel.name].between(channel.min, channel.max).all()
    days = ts["day"].to_numpy()
    np.testing.assert_array_equal(days, np.rint(days))
    assert set(days.astype(int)) == set(range(1, DAYS + 1))
    # sorted by patient, then day
    assert ts.equals(ts.sort_values([schema.id_column, "day"]).reset_index(drop=True))
    assert (ts.groupby(schema.id_column).size() == DAYS).all()


def test_rows_in_any_order_and_padded_cells_load(folder: Path, schema: CohortSchema) -> None:
    ts_path = folder / "timeseries.csv"
    lines = lines_of(ts_path)
    save_lines(ts_path, [lines[0], *reversed(lines[1:])])
    set_cell(folder / "static.csv", 2, "gender", f"  {cell(folder / 'static.csv', 2, 'gender')} ")
    set_cell(folder / "static.csv", 2, "age", f" {cell(folder / 'static.csv', 2, 'age')}  ")
    cohort = load_cohort(folder, schema)
    assert cohort.static["gender"].iloc[0] in {"female", "male", "nonbinary"}
    assert cohort.timeseries is not None
    assert cohort.timeseries["day"].iloc[:DAYS].tolist() == list(range(1, DAYS + 1))


def test_utf8_bom_is_accepted(folder: Path, schema: CohortSchema) -> None:
    path = folder / "static.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_cohort(folder, schema).n_patients == N_PATIENTS


def test_integral_float_in_integer_column_is_accepted(folder: Path, schema: CohortSchema) -> None:
    value = cell(folder / "static.csv", 3, "age")
    set_cell(folder / "static.csv", 3, "age", f"{value}.0")
    cohort = load_cohort(folder, schema)
    assert cohort.static["age"].iloc[1] == int(value)
    assert cohort.static["age"].dtype == np.int64


# ---------------------------------------------------------------- per-cell problems name file, line, column
def test_missing_column(folder: Path, schema: CohortSchema) -> None:
    _drop_column(folder / "static.csv", "bmi")
    err = _load_error(folder, schema)
    assert "static.csv, line 1, column 'bmi': required column is missing" in str(err)


def test_undeclared_extra_column(folder: Path, schema: CohortSchema) -> None:
    lines = lines_of(folder / "static.csv")
    save_lines(folder / "static.csv", [lines[0] + ",shoe_size"] + [line + ",42" for line in lines[1:]])
    err = _load_error(folder, schema)
    assert "static.csv, line 1, column 'shoe_size': column is not declared in the schema" in str(err)


def test_missing_timeseries_channel(folder: Path, schema: CohortSchema) -> None:
    _drop_column(folder / "timeseries.csv", "hrv_ms")
    err = _load_error(folder, schema)
    assert "timeseries.csv, line 1, column 'hrv_ms': required column is missing" in str(err)


@pytest.mark.parametrize(
    ("file", "line", "column", "value", "problem", "problem_class"),
    [
        ("static.csv", 5, "age", "abc", "'abc' is not a number", "not a number"),
        ("static.csv", 7, "age", "150", "150 is outside [18, 90]", "out of range"),
        ("static.csv", 8, "bmi", "-3.5", "-3.5 is outside [14, 50]", "out of range"),
        ("static.csv", 9, "dass_depression", "3.5", "3.5 is not an integer", "not an integer"),
        ("static.csv", 10, "bmi", "", "value is missing", "missing value"),
        ("static.csv", 11, "bmi", "inf", "'inf' is not finite", "not finite"),
        (
            "static.csv",
            12,
            "gender",
            "alien",
            "'alien' is not one of ['female', 'male', 'nonbinary']",
            "unknown category",
        ),
        ("static.csv", 13, "risk_level", "", "'(empty)' is not one of", "unknown category"),
        ("static.csv", 14, "gender", "Female", "'Female' is not one of", "unknown category"),
        ("static.csv", 15, "patient_id", "", "identifier is missing", "missing id"),
        ("timeseries.csv", 20, "sleep_hours", "lots", "'lots' is not a number", "not a number"),
        ("timeseries.csv", 21, "steps", "-1", "-1 is outside [0, 40000]", "out of range"),
        ("timeseries.csv", 22, "resting_hr", "nan", "'nan' is not a number", "not a number"),
    ],
)
def test_bad_cell_is_reported_with_file_line_column_and_class(
    folder: Path,
    schema: CohortSchema,
    file: str,
    line: int,
    column: str,
    value: str,
    problem: str,
    problem_class: str,
) -> None:
    set_cell(folder / file, line, column, value)
    err = _load_error(folder, schema)
    assert f"{file}, line {line}, column '{column}': {problem}" in str(err), str(err)
    assert [(i.file, i.row, i.column, i.problem_class) for i in err.issues if i.file == file] == [
        (file, line, column, problem_class)
    ]


def test_duplicate_patient_id(folder: Path, schema: CohortSchema) -> None:
    first = cell(folder / "static.csv", 3, "patient_id")
    set_cell(folder / "static.csv", 4, "patient_id", first)
    err = _load_error(folder, schema)
    assert f"static.csv, line 4, column 'patient_id': '{first}' repeats" in str(err)
    assert [i.problem_class for i in err.issues if i.file == "static.csv"] == ["duplicate id"]
    # the first occurrence is not blamed
    assert not any(i.file == "static.csv" and i.row == 3 for i in err.issues)


def test_timeseries_missing_day(folder: Path, schema: CohortSchema) -> None:
    path = folder / "timeseries.csv"
    lines = lines_of(path)
    patient = lines[3 * DAYS + 3].split(",")[0]  # a row of the fourth patient
    del lines[3 * DAYS + 3]
    save_lines(path, lines)
    err = _load_error(folder, schema)
    assert len(err.issues) == 1
    issue = err.issues[0]
    assert (issue.file, issue.column) == ("timeseries.csv", "patient_id")
    assert f"patient '{patient}' needs exactly {DAYS} distinct days" in issue.problem
    assert "found 6 rows" in issue.problem
    assert issue.problem_class == "wrong number of days"
    assert f"timeseries.csv, column 'patient_id': patient '{patient}'" in str(err)


def test_timeseries_repeated_day(folder: Path, schema: CohortSchema) -> None:
    path = folder / "timeseries.csv"
    # second patient: day 2 appears twice (its day 3 row now says 2)
    line = DAYS + 1 + 3
    assert cell(path, line, "day") == "3"
    set_cell(path, line, "day", "2")
    patient = cell(path, line, "patient_id")
    err = _load_error(folder, schema)
    assert any(f"patient '{patient}' needs exactly {DAYS} distinct days" in i.problem for i in err.issues)


def test_timeseries_day_out_of_range(folder: Path, schema: CohortSchema) -> None:
    set_cell(folder / "timeseries.csv", 2, "day", "0")
    err = _load_error(folder, schema)
    assert "timeseries.csv, line 2, column 'day': 0 is outside [1, 7]" in str(err)


def test_timeseries_patient_not_in_static(folder: Path, schema: CohortSchema) -> None:
    path = folder / "timeseries.csv"
    lines = lines_of(path)
    extra = [f"P999999,{day}," + ",".join(lines[day].split(",")[2:]) for day in range(1, DAYS + 1)]
    save_lines(path, lines + extra)
    err = _load_error(folder, schema)
    first_line = len(lines) + 1
    assert (
        f"timeseries.csv, line {first_line}, column 'patient_id': 'P999999' has no row in the static table"
        in str(err)
    )
    assert len(err.issues) == DAYS  # one per row, the known patients are all complete
    assert {i.problem_class for i in err.issues} == {"unknown id"}


# ---------------------------------------------------------------- whole-file problems name the file
def test_empty_file(folder: Path, schema: CohortSchema) -> None:
    (folder / "static.csv").write_bytes(b"")
    err = _load_error(folder, schema)
    assert "static.csv: file is empty" in str(err)
    assert err.issues[0] == ValidationIssue("static.csv", None, None, "file is empty", "empty file")


def test_header_only_file(folder: Path, schema: CohortSchema) -> None:
    path = folder / "static.csv"
    save_lines(path, lines_of(path)[:1])
    err = _load_error(folder, schema)
    assert "static.csv: has a header but no data rows" in str(err)


def test_header_only_timeseries(folder: Path, schema: CohortSchema) -> None:
    path = folder / "timeseries.csv"
    save_lines(path, lines_of(path)[:1])
    err = _load_error(folder, schema)
    assert "timeseries.csv: has a header but no data rows" in str(err)


def test_non_utf8_bytes(folder: Path, schema: CohortSchema) -> None:
    path = folder / "static.csv"
    data = path.read_bytes()
    offset = data.index(b"female")
    path.write_bytes(data[:offset] + b"f\xe9male" + data[offset + len(b"female") :])
    err = _load_error(folder, schema)
    assert f"static.csv: not UTF-8 text (byte {offset + 1})" in str(err)


def test_ragged_csv_is_reported_not_raised(folder: Path, schema: CohortSchema) -> None:
    path = folder / "static.csv"
    lines = lines_of(path)
    lines[5] += ",1,2,3"
    save_lines(path, lines)
    err = _load_error(folder, schema)
    assert "static.csv: not a valid CSV table" in str(err)


def test_missing_static_file(folder: Path, schema: CohortSchema) -> None:
    (folder / "static.csv").unlink()
    err = _load_error(folder, schema)
    assert "static.csv: file not found in the cohort folder" in str(err)
    assert len(err.issues) == 1  # the timeseries is not blamed for the missing static table


def test_missing_timeseries_file(folder: Path, schema: CohortSchema) -> None:
    (folder / "timeseries.csv").unlink()
    err = _load_error(folder, schema)
    assert "timeseries.csv: file not found in the cohort folder" in str(err)


def test_folder_not_found(tmp_path: Path, schema: CohortSchema) -> None:
    missing = tmp_path / "no-such-hospital"
    err = _load_error(missing, schema)
    assert err.folder == missing
    assert f"{missing}: folder not found" in str(err)


def test_a_file_is_not_a_folder(tmp_path: Path, schema: CohortSchema) -> None:
    path = tmp_path / "static.csv"
    path.write_text("patient_id\n", encoding="utf-8")
    assert "folder not found" in str(_load_error(path, schema))


def test_cohort_validation_error_is_a_value_error() -> None:
    assert issubclass(CohortValidationError, ValueError)


# ---------------------------------------------------------------- every problem is reported
def test_several_problems_are_all_listed(folder: Path, schema: CohortSchema) -> None:
    set_cell(folder / "static.csv", 2, "age", "abc")
    set_cell(folder / "static.csv", 3, "gender", "alien")
    set_cell(folder / "static.csv", 4, "dass_stress", "99")
    set_cell(folder / "timeseries.csv", 5, "hrv_ms", "1000")
    set_cell(folder / "timeseries.csv", 6, "steps", "x")
    err = _load_error(folder, schema)
    message = str(err)
    assert "(5 problems)" in message
    for expected in [
        "static.csv, line 2, column 'age'",
        "static.csv, line 3, column 'gender'",
        "static.csv, line 4, column 'dass_stress'",
        "timeseries.csv, line 5, column 'hrv_ms'",
        "timeseries.csv, line 6, column 'steps'",
    ]:
        assert expected in message
    assert "refusing to train" in message


def test_problems_beyond_the_cap_are_counted(folder: Path, schema: CohortSchema) -> None:
    n_bad = MAX_REPORTED_ISSUES + 10
    path = folder / "static.csv"
    lines = lines_of(path)
    index = lines[0].split(",").index("age")
    for line in range(2, 2 + n_bad):
        cells = lines[line - 1].split(",")
        cells[index] = "999"
        lines[line - 1] = ",".join(cells)
    save_lines(path, lines)
    err = _load_error(folder, schema)
    assert len(err.issues) == n_bad  # the exception keeps them all
    message = str(err)
    assert f"({n_bad} problems)" in message
    assert message.count("is outside [18, 90]") == MAX_REPORTED_ISSUES
    assert "... and 10 more" in message
    assert f"line {2 + MAX_REPORTED_ISSUES - 1}, column 'age'" in message
    assert f"line {2 + MAX_REPORTED_ISSUES}, column 'age'" not in message


def test_single_problem_is_singular(folder: Path, schema: CohortSchema) -> None:
    set_cell(folder / "static.csv", 2, "age", "abc")
    assert "(1 problem)" in str(_load_error(folder, schema))


# ---------------------------------------------------------------- known bugs
def test_line_numbers_count_blank_lines(folder: Path, schema: CohortSchema) -> None:
    path = folder / "static.csv"
    lines = lines_of(path)
    lines.insert(3, "")  # file line 4 is now blank
    save_lines(path, lines)
    set_cell(path, 6, "age", "abc")
    err = _load_error(folder, schema)
    assert "static.csv, line 6, column 'age'" in str(err), str(err)


def test_unreadable_parquet_is_a_validation_error(folder: Path, schema: CohortSchema) -> None:
    # CSV bytes are not a parquet file; without pyarrow/fastparquet (not project dependencies)
    # pandas raises ImportError, which must be reported too, not raised.
    (folder / "static.csv").rename(folder / "static.parquet")
    err = _load_error(folder, schema)
    assert "static.parquet: cannot be read" in str(err)


# ---------------------------------------------------------------- problem classes
def _empty_static(folder: Path) -> None:
    (folder / "static.csv").write_bytes(b"")


def _header_only_static(folder: Path) -> None:
    save_lines(folder / "static.csv", lines_of(folder / "static.csv")[:1])


def _latin1_static(folder: Path) -> None:
    path = folder / "static.csv"
    path.write_bytes(path.read_bytes().replace(b"female", b"f\xe9male", 1))


def _ragged_static(folder: Path) -> None:
    lines = lines_of(folder / "static.csv")
    lines[5] += ",1,2,3"
    save_lines(folder / "static.csv", lines)


def _no_static(folder: Path) -> None:
    (folder / "static.csv").unlink()


def _no_bmi(folder: Path) -> None:
    _drop_column(folder / "static.csv", "bmi")


def _extra_column(folder: Path) -> None:
    lines = lines_of(folder / "static.csv")
    save_lines(folder / "static.csv", [lines[0] + ",shoe_size"] + [line + ",42" for line in lines[1:]])


def _csv_as_parquet(folder: Path) -> None:
    (folder / "static.csv").rename(folder / "static.parquet")


@pytest.mark.parametrize(
    ("corrupt", "problem_class"),
    [
        (_empty_static, "empty file"),
        (_header_only_static, "no data rows"),
        (_latin1_static, "not UTF-8"),
        (_ragged_static, "not a CSV table"),
        (_no_static, "file not found"),
        (_no_bmi, "missing column"),
        (_extra_column, "unexpected column"),
        (_csv_as_parquet, "unreadable file"),
    ],
)
def test_whole_file_problems_have_their_class(
    folder: Path, schema: CohortSchema, corrupt, problem_class: str
) -> None:
    corrupt(folder)
    assert [i.problem_class for i in _load_error(folder, schema).issues] == [problem_class]


def test_missing_folder_has_its_class(tmp_path: Path, schema: CohortSchema) -> None:
    assert _load_error(tmp_path / "nope", schema).issues[0].problem_class == "folder not found"


def test_a_problem_class_outside_the_vocabulary_is_refused() -> None:
    assert "out of range" in PROBLEM_CLASSES
    with pytest.raises(ValueError, match="unknown problem class"):
        ValidationIssue("static.csv", 2, "age", "'P000001' is odd", "P000001 is odd")  # type: ignore[arg-type]


# ---------------------------------------------------------------- bounded detail
def test_clip_cuts_long_text_with_an_ellipsis() -> None:
    assert clip("short") == "short"
    cut = clip("x" * 1000)
    assert len(cut) == MAX_QUOTED_CHARS and cut.endswith("...")
    assert clip("abcdef", 5) == "ab..."


def test_a_long_problem_is_cut_at_construction() -> None:
    issue = ValidationIssue("static.csv", None, None, "cannot be read: " + "y" * 10**6, "unreadable file")
    assert len(issue.problem) == MAX_PROBLEM_CHARS


MEGABYTE = 1_000_000


@pytest.mark.parametrize(
    ("file", "line", "column", "value"),
    [
        ("static.csv", 3, "age", "x" * MEGABYTE),  # not a number
        ("static.csv", 4, "age", "9" * MEGABYTE),  # a number too large to be finite or in range
        ("static.csv", 5, "dass_depression", "3." + "5" * MEGABYTE),  # not an integer, out of range
        ("static.csv", 6, "gender", "F" * MEGABYTE),  # unknown category
        ("static.csv", 7, "patient_id", "P" * MEGABYTE),  # no timeseries: wrong number of days
        ("timeseries.csv", 8, "patient_id", "Q" * MEGABYTE),  # unknown id
    ],
)
def test_a_megabyte_cell_gives_a_short_detail(
    folder: Path, schema: CohortSchema, file: str, line: int, column: str, value: str
) -> None:
    set_cell(folder / file, line, column, value)
    err = _load_error(folder, schema)
    assert all(len(issue.problem) <= MAX_PROBLEM_CHARS for issue in err.issues)
    message = str(err)
    assert len(message) < 200 * (len(err.issues) + 1) + len(str(folder)), len(message)
    assert value[:MAX_QUOTED_CHARS] not in message
    assert value[: MAX_QUOTED_CHARS - 3] + "..." in message  # the start still helps find the cell


def test_a_megabyte_header_cell_gives_a_short_column(folder: Path, schema: CohortSchema) -> None:
    lines = lines_of(folder / "static.csv")
    save_lines(folder / "static.csv", [lines[0] + "," + "c" * MEGABYTE] + [line + ",1" for line in lines[1:]])
    (issue,) = _load_error(folder, schema).issues
    assert issue.problem_class == "unexpected column"
    assert issue.column is not None and len(issue.column) == MAX_QUOTED_CHARS


# ---------------------------------------------------------------- salted holdout split
SALT = b"node-secret-salt-one"
OTHER_SALT = b"node-secret-salt-two"
N_IDS = 5000


def _id_cohort(n: int = N_IDS) -> Cohort:
    ids = [f"P{i:06d}" for i in range(n)]
    return Cohort(static=pd.DataFrame({"patient_id": ids, "age": np.arange(n) % 70 + 18}), timeseries=None)


def _held(cohort: Cohort, salt: bytes, share: float = 0.2) -> set[str]:
    _, holdout = split_holdout(cohort, share=share, id_column="patient_id", salt=salt)
    return set(holdout.static["patient_id"])


def _unsalted_held(ids: list[str], share: float) -> set[str]:
    """The old assignment: an unsalted SHA-256 of the id, which anyone could recompute."""
    digest = {pid: int.from_bytes(hashlib.sha256(pid.encode()).digest()[:8], "big") / 2**64 for pid in ids}
    return {pid for pid, u in digest.items() if u < share}


def test_salted_split_is_stable_and_independent_of_row_order() -> None:
    cohort = _id_cohort()
    shuffled = Cohort(static=cohort.static.sample(frac=1.0, random_state=4), timeseries=None)
    assert _held(cohort, SALT) == _held(cohort, SALT) == _held(shuffled, SALT)
    assert _held(cohort, SALT) == _held(cohort, bytearray(SALT))


def test_salted_split_differs_between_salts() -> None:
    cohort = _id_cohort()
    first, second = _held(cohort, SALT), _held(cohort, OTHER_SALT)
    assert first != second
    # independent draws: about share of one salt's holdout is held out by the other too
    assert len(first & second) < 0.3 * len(first)


@pytest.mark.parametrize("share", [0.1, 0.2, 0.5])
def test_salted_split_keeps_the_share(share: float) -> None:
    held = _held(_id_cohort(), SALT, share)
    assert abs(len(held) / N_IDS - share) < 0.03


def test_salted_split_does_not_reproduce_the_unsalted_assignment() -> None:
    cohort = _id_cohort()
    old = _unsalted_held(list(cohort.static["patient_id"]), 0.2)
    new = _held(cohort, SALT)
    assert new != old
    assert len(new & old) < 0.3 * len(old)


def test_salted_split_partitions_patients_and_their_days(folder: Path, schema: CohortSchema) -> None:
    cohort = load_cohort(folder, schema)
    members, holdout = split_holdout(cohort, share=0.3, id_column="patient_id", salt=SALT)
    member_ids, held_ids = set(members.static["patient_id"]), set(holdout.static["patient_id"])
    assert not member_ids & held_ids
    assert member_ids | held_ids == set(cohort.static["patient_id"])
    assert members.timeseries is not None and holdout.timeseries is not None
    assert set(members.timeseries["patient_id"]) == member_ids
    assert set(holdout.timeseries["patient_id"]) == held_ids
    assert len(members.timeseries) + len(holdout.timeseries) == N_PATIENTS * DAYS


def test_split_refuses_a_missing_empty_or_text_salt() -> None:
    cohort = _id_cohort(10)
    with pytest.raises(TypeError):
        split_holdout(cohort, share=0.2, id_column="patient_id")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="salt is empty"):
        split_holdout(cohort, share=0.2, id_column="patient_id", salt=b"")
    with pytest.raises(TypeError, match="must be bytes"):
        split_holdout(cohort, share=0.2, id_column="patient_id", salt="secret")  # type: ignore[arg-type]


# ---------------------------------------------------------------- command line
def _flat(text: str) -> str:
    """Rich wraps long lines at the runner's 80 columns; compare on single spaces."""
    return " ".join(text.split())


def test_cli_generate_with_bogus_bundle_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    bogus = tmp_path / "nope"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = CliRunner().invoke(
        app, ["generate", "--model", str(bogus), "-n", "5", "--out", str(out_dir / "synthetic.csv")]
    )
    assert result.exit_code == 2, result.output
    message = _flat(result.output)
    assert "error:" in message
    assert "is not a model bundle" in message
    assert "model_card.json not found" in message
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []


def test_cli_generate_with_a_cohort_folder_as_bundle_exits_2(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "synthetic.csv"
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "-n", "5", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "is not a model bundle" in _flat(result.output)
    assert not out.exists()


def test_cli_cohort_writes_folders_that_load(tmp_path: Path, schema: CohortSchema) -> None:
    out = tmp_path / "cohort"
    result = CliRunner().invoke(
        app, ["cohort", "--out", str(out), "--patients", "60", "--hospitals", "2", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert folders == ["hospital-1", "hospital-2"]
    cohorts = [load_cohort(out / name, schema) for name in folders]
    assert sum(c.n_patients for c in cohorts) == 60
    ids = pd.concat([c.static["patient_id"] for c in cohorts])
    assert ids.is_unique


def test_cli_cohort_with_bad_partition_exits_2_naming_the_key(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    result = CliRunner().invoke(
        app, ["cohort", "--out", str(out), "--patients", "60", "--partition", "weird"]
    )
    assert result.exit_code == 2, result.output
    assert "federation.partition" in _flat(result.output)
    assert not out.exists()


def test_cli_check_accepts_a_valid_folder(folder: Path) -> None:
    result = CliRunner().invoke(app, ["check", "--data", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"{N_PATIENTS} patients" in _flat(result.output)


def test_cli_check_reports_file_line_and_column(folder: Path) -> None:
    set_cell(folder / "static.csv", 5, "age", "abc")
    result = CliRunner().invoke(app, ["check", "--data", str(folder)])
    assert result.exit_code == 2, result.output
    assert "static.csv, line 5, column 'age': 'abc' is not a number" in _flat(result.output)
    assert "Traceback" not in result.output
