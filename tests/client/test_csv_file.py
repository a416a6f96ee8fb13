"""Tests for client.csv_file: a broken file gets one line naming file, line and column, fast."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from client.csv_file import (
    MAX_CELL_CHARS,
    MAX_QUOTED_CHARS,
    find_nul,
    separator_hint,
    text_problems,
)
from client.data import MAX_PROBLEM_CHARS, CohortValidationError, ValidationIssue, load_cohort
from configs.schema import CohortSchema, load_schema
from simulation.cohort import DemoCohort, generate_demo_cohort, write_cohort_folder
from tests.support.csv_cells import lines_of, save_lines, set_cell

FORTY_MB = 40_000_000
# A correctness bound, not a benchmark: the cell must be refused before any slow parsing path.
REFUSAL_SECONDS = 5.0
MESSAGE_CHARS = 300


@pytest.fixture(scope="module")
def schema() -> CohortSchema:
    return load_schema()


@pytest.fixture(scope="module")
def demo() -> DemoCohort:
    return generate_demo_cohort(50, seed=4)


@pytest.fixture
def folder(tmp_path: Path, demo: DemoCohort) -> Path:
    path = tmp_path / "h"
    write_cohort_folder(demo, path)
    return path


def _only_issue(folder: Path, schema: CohortSchema) -> tuple[ValidationIssue, CohortValidationError]:
    with pytest.raises(CohortValidationError) as info:
        load_cohort(folder, schema)
    assert len(info.value.issues) == 1, str(info.value)
    return info.value.issues[0], info.value


def _one_line(issue: ValidationIssue, file: str, line: int, column: str) -> str:
    shown = str(issue)
    assert "\n" not in shown and len(shown) < MESSAGE_CHARS, shown
    assert shown.startswith(f"{file}, line {line}, column '{column}': "), shown
    return shown


# ---------------------------------------------------------------- a good folder is untouched
def test_a_good_demo_folder_loads_identically(folder: Path, schema: CohortSchema, demo: DemoCohort) -> None:
    for name in ("static.csv", "timeseries.csv"):
        assert text_problems((folder / name).read_text(encoding="utf-8")) == []
    cohort = load_cohort(folder, schema)
    pd.testing.assert_frame_equal(cohort.static, demo.static, check_dtype=False)
    assert cohort.timeseries is not None
    expected = demo.timeseries.sort_values(["patient_id", "day"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(cohort.timeseries, expected, check_dtype=False)


# ---------------------------------------------------------------- another separator
@pytest.mark.parametrize(
    ("file", "separator", "decimal", "name"),
    [
        ("static.csv", ";", ".", "semicolon"),
        ("static.csv", ";", ",", "semicolon"),  # the usual pair in a European spreadsheet
        ("static.csv", "\t", ".", "tab"),
        ("timeseries.csv", ";", ".", "semicolon"),
    ],
)
def test_another_separator_is_named_once(
    folder: Path, schema: CohortSchema, demo: DemoCohort, file: str, separator: str, decimal: str, name: str
) -> None:
    table = demo.static if file == "static.csv" else demo.timeseries
    table.to_csv(folder / file, sep=separator, decimal=decimal, index=False)
    issue, _ = _only_issue(folder, schema)
    header = separator.join(table.columns)
    shown = _one_line(issue, file, 1, header[: MAX_QUOTED_CHARS - 3].replace("\t", "\\x09") + "...")
    assert f"looks {name}-separated: the header has {len(table.columns) - 1} {name}s and no comma" in shown
    assert issue.problem_class == "not comma-separated"


def test_separator_hint_leaves_comma_and_single_column_headers_alone() -> None:
    assert separator_hint("patient_id,age;x") is None
    assert separator_hint("patient_id") is None
    assert separator_hint("a|b|c") is not None and "pipe" in (separator_hint("a|b|c") or "")


# ---------------------------------------------------------------- a huge cell
@pytest.mark.parametrize(
    ("file", "line", "column"),
    [
        ("static.csv", 5, "patient_id"),
        ("static.csv", 6, "age"),
        ("static.csv", 7, "gender"),
        ("timeseries.csv", 8, "patient_id"),
        ("timeseries.csv", 9, "steps"),
    ],
)
def test_a_40_mb_cell_is_refused_fast_with_a_short_message(
    folder: Path, schema: CohortSchema, file: str, line: int, column: str
) -> None:
    value = "9" * FORTY_MB if column in {"age", "steps"} else "Q" * FORTY_MB
    set_cell(folder / file, line, column, value)
    start = time.perf_counter()
    issue, err = _only_issue(folder, schema)
    seconds = time.perf_counter() - start
    assert seconds < REFUSAL_SECONDS, seconds
    shown = _one_line(issue, file, line, column)
    assert f"cell of {FORTY_MB:,} characters (at most {MAX_CELL_CHARS:,})" in shown
    assert value[: MAX_QUOTED_CHARS - 3] + "..." in shown and value[:MAX_QUOTED_CHARS] not in shown
    assert issue.problem_class == "cell too long"
    # the whole message, less the folder's own path (as long as the user's storage makes it)
    assert len(str(err)) - len(str(folder)) < MESSAGE_CHARS, str(err)


def test_a_cell_at_the_bound_is_parsed_as_usual(folder: Path, schema: CohortSchema) -> None:
    set_cell(folder / "static.csv", 3, "gender", "f" * MAX_CELL_CHARS)
    issue, _ = _only_issue(folder, schema)
    assert issue.problem_class == "unknown category"


# ---------------------------------------------------------------- NUL and other control characters
def test_a_nul_in_an_id_is_refused_where_it_is(folder: Path, schema: CohortSchema) -> None:
    # pandas' parser would silently cut the cell at the NUL: 'P\x00000003' would read as 'P'
    set_cell(folder / "static.csv", 4, "patient_id", "P\x00000003")
    issue, _ = _only_issue(folder, schema)
    shown = _one_line(issue, "static.csv", 4, "patient_id")
    assert "NUL character at character 2 of the cell (1 in the file)" in shown
    assert issue.problem_class == "NUL character"


def test_a_nul_in_the_timeseries_is_refused(folder: Path, schema: CohortSchema) -> None:
    set_cell(folder / "timeseries.csv", 10, "hrv_ms", "4\x005")
    issue, _ = _only_issue(folder, schema)
    _one_line(issue, "timeseries.csv", 10, "hrv_ms")


def test_find_nul_counts_fields_outside_quotes() -> None:
    nul = find_nul('id,note,age\nP1,"a, b",3\x004\n\x00')
    assert nul is not None
    assert (nul.line, nul.field, nul.position, nul.count) == (2, 2, 2, 2)
    assert find_nul("id,age\nP1,3\n") is None


@pytest.mark.parametrize(
    ("file", "line", "value", "code", "position"),
    [
        ("static.csv", 6, "P00\x1b[31m0005", "001B", 4),  # ESC: would colour the terminal
        ("static.csv", 7, "P000006\x1f", "001F", 8),  # stripping would have hidden it
        ("static.csv", 8, "P00\t0007", "0009", 4),
        ("timeseries.csv", 3, "P000001\x07", "0007", 8),
    ],
)
def test_a_control_character_in_an_id_is_refused_once(
    folder: Path, schema: CohortSchema, file: str, line: int, value: str, code: str, position: int
) -> None:
    set_cell(folder / file, line, "patient_id", value)
    issue, err = _only_issue(folder, schema)
    shown = _one_line(issue, file, line, "patient_id")
    assert f"identifier holds a control character U+{code} at character {position}" in shown
    assert issue.problem_class == "control character"
    assert "\x1b" not in str(err) and "\x07" not in str(err)


def test_an_issue_is_always_one_line() -> None:
    issue = ValidationIssue(
        "static.csv", 2, "gen\nder", "'fe\nmale\x1b[2J' is not one of", "unknown category"
    )
    shown = str(issue)
    assert "\n" not in shown and "\x1b" not in shown
    assert "column 'gen\\x0ader'" in shown and "'fe\\x0amale\\x1b[2J'" in shown
    long = ValidationIssue("static.csv", None, None, "\x00" * 10 * MAX_PROBLEM_CHARS, "unreadable file")
    assert len(long.problem) == MAX_PROBLEM_CHARS


def test_blank_lines_keep_their_line_numbers_for_file_problems(folder: Path, schema: CohortSchema) -> None:
    path = folder / "static.csv"
    lines = lines_of(path)
    lines.insert(2, "")  # file line 3 is now blank
    save_lines(path, lines)
    set_cell(path, 5, "patient_id", "P\x00x")
    issue, _ = _only_issue(folder, schema)
    _one_line(issue, "static.csv", 5, "patient_id")
