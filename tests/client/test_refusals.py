"""Tests for client.refusals: the coordinator learns where and what kind, never ids or values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from client.data import CohortValidationError, load_cohort
from client.refusals import (
    MAX_PUBLIC_ISSUES,
    MAX_REASON_CHARS,
    local_detail,
    log_refusal_detail,
    public_issue,
    public_reason,
)
from configs.schema import CohortSchema, load_schema
from configs.wire import WireError
from models.encoder import EncoderError
from models.releases.base import ReleaseError
from privacy.ledger import BudgetExceededError
from simulation.cohort import generate_demo_cohort, write_cohort_folder
from tests.support.csv_cells import cell, lines_of, set_cell

HOSPITAL = "hospital-7"
SECRET_VALUE = "zz-unique-9f3a"
DAYS = 7


@pytest.fixture(scope="module")
def schema() -> CohortSchema:
    return load_schema()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "secret-storage" / "ward-b-cohort"
    write_cohort_folder(generate_demo_cohort(40, seed=5, days=DAYS), path)
    return path


def _error(folder: Path, schema: CohortSchema) -> CohortValidationError:
    with pytest.raises(CohortValidationError) as info:
        load_cohort(folder, schema)
    return info.value


# ---------------------------------------------------------------- invalid cohort data
def test_reason_names_file_line_column_and_class_but_no_value_id_or_path(
    folder: Path, schema: CohortSchema
) -> None:
    static = folder / "static.csv"
    set_cell(static, 5, "age", SECRET_VALUE)
    repeated = cell(static, 3, "patient_id")
    set_cell(static, 4, "patient_id", repeated)
    err = _error(folder, schema)
    assert SECRET_VALUE in str(err) and repeated in str(err)  # the local detail keeps them

    reason = public_reason(err, HOSPITAL)

    assert reason.startswith(f"{HOSPITAL}: ")
    assert "static.csv, line 5, column 'age': not a number" in reason, reason
    assert "static.csv, line 4, column 'patient_id': duplicate id" in reason, reason
    for secret in (SECRET_VALUE, repeated, str(folder), folder.name, folder.parent.name):
        assert secret not in reason, secret


def test_timeseries_problems_do_not_name_the_patient(folder: Path, schema: CohortSchema) -> None:
    path = folder / "timeseries.csv"
    lines = lines_of(path)
    patient = lines[1].split(",")[0]
    del lines[1]  # the first patient now has six days
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reason = public_reason(_error(folder, schema), HOSPITAL)
    assert "timeseries.csv, column 'patient_id': wrong number of days" in reason, reason
    assert patient not in reason


def test_header_cells_from_the_file_stay_local(folder: Path, schema: CohortSchema) -> None:
    # a header that is really a data row: its cells become column names
    static = folder / "static.csv"
    lines = lines_of(static)
    static.write_text(
        "\n".join([lines[0] + f",{SECRET_VALUE}", *(line + ",1" for line in lines[1:])]) + "\n",
        encoding="utf-8",
    )
    reason = public_reason(_error(folder, schema), HOSPITAL)
    assert "static.csv, line 1: unexpected column" in reason, reason
    assert SECRET_VALUE not in reason


@pytest.mark.parametrize(
    ("header", "problem_class"),
    [
        (lambda h: h.replace(",", ";") + f";{SECRET_VALUE}", "not comma-separated"),
        (lambda h: h + f",{SECRET_VALUE}\x00", "NUL character"),
    ],
)
def test_file_problems_named_by_header_cells_keep_them_local(
    folder: Path, schema: CohortSchema, header, problem_class: str
) -> None:
    static = folder / "static.csv"
    lines = lines_of(static)
    static.write_text("\n".join([header(lines[0]), *lines[1:]]) + "\n", encoding="utf-8")
    reason = public_reason(_error(folder, schema), HOSPITAL)
    assert f"static.csv, line 1: {problem_class}" in reason, reason
    assert SECRET_VALUE not in reason


def test_missing_folder_does_not_send_its_path(tmp_path: Path, schema: CohortSchema) -> None:
    missing = tmp_path / "private-share" / "no-such-cohort"
    reason = public_reason(_error(missing, schema), HOSPITAL)
    assert "cohort folder: folder not found" in reason
    assert "private-share" not in reason and "no-such-cohort" not in reason


def test_only_the_first_issues_are_listed_then_a_count(folder: Path, schema: CohortSchema) -> None:
    n_bad = MAX_PUBLIC_ISSUES + 7
    for line in range(2, 2 + n_bad):
        set_cell(folder / "static.csv", line, "age", f"{SECRET_VALUE}-{line}")
    err = _error(folder, schema)
    reason = public_reason(err, HOSPITAL)
    assert f"({len(err.issues)} problems)" in reason
    assert reason.count(": not a number") == MAX_PUBLIC_ISSUES
    assert f"and {len(err.issues) - MAX_PUBLIC_ISSUES} more" in reason
    assert SECRET_VALUE not in reason


def test_a_megabyte_cell_gives_a_short_reason(folder: Path, schema: CohortSchema) -> None:
    set_cell(folder / "static.csv", 6, "gender", "F" * 1_000_000)
    err = _error(folder, schema)
    reason = public_reason(err, HOSPITAL)
    assert len(reason) < 300, reason
    assert "static.csv, line 6, column 'gender': cell too long" in reason
    assert len(local_detail(err)) < 4000 + len(str(folder))


def test_public_issue_is_where_and_class_only(folder: Path, schema: CohortSchema) -> None:
    set_cell(folder / "static.csv", 9, "bmi", "99")
    (issue,) = _error(folder, schema).issues
    assert public_issue(issue) == "static.csv, line 9, column 'bmi': out of range"


# ---------------------------------------------------------------- other refusals
@pytest.mark.parametrize("kind", [BudgetExceededError, EncoderError, WireError, ReleaseError])
def test_our_own_refusal_messages_are_kept_but_bounded(kind: type[Exception]) -> None:
    assert public_reason(kind("max epsilon 4 would be exceeded"), HOSPITAL) == (
        f"{HOSPITAL}: max epsilon 4 would be exceeded"
    )
    long = public_reason(kind("w" * 1_000_000), HOSPITAL)
    assert len(long) <= len(HOSPITAL) + 2 + MAX_REASON_CHARS
    assert long.endswith("...")


def test_unknown_errors_send_only_their_class_name() -> None:
    reason = public_reason(KeyError(f"P000001 {SECRET_VALUE}"), HOSPITAL)
    assert reason == f"{HOSPITAL}: KeyError"


# ---------------------------------------------------------------- the hospital's own log
def test_local_log_keeps_the_detail(
    folder: Path, schema: CohortSchema, caplog: pytest.LogCaptureFixture
) -> None:
    set_cell(folder / "static.csv", 5, "age", SECRET_VALUE)
    err = _error(folder, schema)
    logger = logging.getLogger("tests.refusals")
    with caplog.at_level(logging.WARNING, logger="tests.refusals"):
        log_refusal_detail(logger, HOSPITAL, err, request="query.handshake")
    (record,) = caplog.records
    text = record.getMessage()
    assert HOSPITAL in text and "query.handshake" in text
    assert f"'{SECRET_VALUE}' is not a number" in text


def test_local_detail_of_a_huge_message_is_bounded() -> None:
    assert len(local_detail(ValueError("v" * 1_000_000))) <= 4000
