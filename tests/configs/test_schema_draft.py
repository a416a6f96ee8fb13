"""Tests for configs.schema_draft and `init`'s reading: names and kinds in, never a value."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from client.data import load_cohort
from client.schema_init import draft_for_files, value_kind
from configs.errors import ConfigError
from configs.schema import PLACEHOLDER, CohortSchema, load_schema, placeholders
from configs.schema_draft import DraftError, draft_schema
from simulation.cohort import DemoCohort, generate_demo_cohort, write_cohort_folder
from tests.support.schema_fill import fill_placeholders


@pytest.fixture(scope="module")
def demo() -> DemoCohort:
    return generate_demo_cohort(120, seed=21)


@pytest.fixture
def folder(tmp_path: Path, demo: DemoCohort) -> Path:
    path = tmp_path / "hospital"
    write_cohort_folder(demo, path)
    return path


@pytest.fixture
def draft(folder: Path) -> str:
    return draft_for_files(folder / "static.csv", folder / "timeseries.csv")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _values_of(demo: DemoCohort) -> set[str]:
    """Every category and id of the rows, and each numeric column's lowest and highest value."""
    values: set[str] = set()
    for table in (demo.static, demo.timeseries):
        for column in table.columns:
            series = table[column]
            if pd.api.types.is_numeric_dtype(series):
                for value in (series.min(), series.max()):
                    values |= {str(value), f"{value:g}", f"{float(value)}"}
                    if float(value).is_integer():
                        values.add(str(int(value)))
            else:
                values |= set(series.astype(str))
    return values


# ---------------------------------------------------------------- the demo's own files
def test_the_draft_holds_no_value_from_the_rows(draft: str, demo: DemoCohort) -> None:
    tokens = set(re.findall(r"[^\s\"'=,()\[\]#:;`]+", draft))
    leaked = tokens & _values_of(demo)
    assert not leaked, leaked
    # stronger for this cohort, whose column names hold no digit: no number at all
    assert not re.search(r"\d", draft)


def test_the_draft_declares_every_column_and_its_kind(draft: str, demo: DemoCohort) -> None:
    data = tomllib.loads(draft)
    shipped = load_schema()
    assert (data["id_column"], data["label_column"]) == (shipped.id_column, shipped.label_column)
    assert [(c["name"], c["kind"]) for c in data["columns"]] == [(c.name, c.kind) for c in shipped.columns]
    sequence = data["sequence"]
    assert sequence["day_column"] == "day"
    assert [c["name"] for c in sequence["channels"]] == [c.name for c in shipped.sequence.channels]  # type: ignore[union-attr]
    prose = " ".join(draft.replace("#", " ").split())
    assert "the highest age of a cohort is one patient's age" in prose  # why ranges are left to fill


def test_loading_the_draft_names_each_placeholder(tmp_path: Path, draft: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_schema(_write(tmp_path, draft))
    message = str(info.value)
    assert "is a draft: fill its FILL ME placeholders from public knowledge" in message
    for expected in [
        "column 'age': min is a placeholder",
        "column 'gender': categories is a placeholder",
        "column 'risk_level': categories is a placeholder",
        "sequence: length is a placeholder",
    ]:
        assert expected in message, message
    assert "... and " in message  # two per column and channel: the list is cut, then counted


def test_a_filled_draft_validates_the_demo_cohort(tmp_path: Path, draft: str, folder: Path) -> None:
    shipped = load_schema()
    schema = load_schema(_write(tmp_path, fill_placeholders(draft, shipped)))
    assert [c.name for c in schema.columns] == shipped.column_names
    cohort = load_cohort(folder, schema)
    pd.testing.assert_frame_equal(cohort.static, load_cohort(folder, shipped).static)


def test_one_placeholder_left_is_still_refused(tmp_path: Path, draft: str) -> None:
    filled = fill_placeholders(draft, load_schema()).splitlines()
    index = next(i for i, line in enumerate(filled) if line.startswith("max = ") and i > 0)
    filled[index] = f'max = "{PLACEHOLDER}: the highest value"'
    with pytest.raises(ConfigError, match=r"column 'age': max is a placeholder, still to fill"):
        load_schema(_write(tmp_path, "\n".join(filled)))


def test_the_shipped_schema_has_no_placeholder() -> None:
    assert placeholders(tomllib.loads(Path("configs/cohort.toml").read_text(encoding="utf-8"))) == []


def test_a_placeholder_inside_a_list_is_found() -> None:
    data = {"columns": [{"name": "g", "categories": ["a", f"{PLACEHOLDER}: more"]}]}
    assert placeholders(data) == ["column 'g': categories is a placeholder, still to fill"]


# ---------------------------------------------------------------- guesses
def test_without_telling_names_the_id_is_first_and_the_label_last() -> None:
    text = draft_schema([("code", "categorical"), ("score", "integer"), ("grade", "integer")])
    data = tomllib.loads(text)
    assert (data["id_column"], data["label_column"]) == ("code", "grade")
    assert "# guessed: the first column of static.csv; check" in text
    assert "# guessed: the last column of static.csv; check" in text
    # the label is a class even when coded as numbers
    assert data["columns"][1] == {
        "name": "grade",
        "kind": "categorical",
        "categories": data["columns"][1]["categories"],
    }
    assert data["columns"][1]["categories"].startswith(PLACEHOLDER)


def test_telling_names_win_over_positions() -> None:
    static = [("outcome", "categorical"), ("age", "integer"), ("Subject_ID", "categorical"), ("x", None)]
    ts = [
        ("day_index", "integer"),
        ("Subject_ID", "categorical"),
        ("hr", "continuous"),
        ("mood", "categorical"),
    ]
    text = draft_schema(static, ts)
    data = tomllib.loads(text)
    assert (data["id_column"], data["label_column"]) == ("Subject_ID", "outcome")
    assert data["sequence"]["day_column"] == "day_index"
    assert [c["name"] for c in data["sequence"]["channels"]] == ["hr", "mood"]
    assert "its values read as text, and a channel is a number: check this column" in text
    assert "it holds no value to tell from; check" in text


def test_odd_names_survive_the_round_trip() -> None:
    odd = 'we"ird\\name\tx'
    data = tomllib.loads(draft_schema([("id", "categorical"), (odd, "continuous"), ("label", "categorical")]))
    assert data["columns"][0]["name"] == odd


_THREE = [("id", "integer"), ("a", "integer"), ("y", "integer")]


@pytest.mark.parametrize(
    ("static", "timeseries", "expected"),
    [
        ([("id", "integer"), ("a", "integer"), ("a", "integer")], None, "names a column more than once"),
        ([("id", "integer"), ("", "integer"), ("y", "integer")], None, "a column with no name"),
        ([("id", "integer"), ("y", "integer")], None, "a schema needs an id, a label and data"),
        (_THREE, [("pid", None), ("day", None), ("hr", None)], "has no column 'id'"),
        (_THREE, [("id", None), ("day", None)], "needs a day column and at least one channel"),
    ],
)  # fmt: skip
def test_headers_that_make_no_schema_are_refused(static, timeseries, expected: str) -> None:
    with pytest.raises(DraftError, match=re.escape(expected)):
        draft_schema(static, timeseries)


# ---------------------------------------------------------------- reading the files
@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (["1", " 2", "+3", "-4", ""], "integer"),
        (["1", "2.5", "3.0", "1e3", ".5"], "continuous"),
        (["1", "two"], "categorical"),
        (["nan", "1"], "categorical"),  # a missing value written as text is not a number's type
        (["", " "], None),
    ],
)
def test_value_kind_reads_types_from_the_text(values: list[str], kind: str | None) -> None:
    assert value_kind(pd.Series(values, dtype=object)) == kind


def test_init_refuses_a_semicolon_file_and_a_repeated_name(folder: Path, demo: DemoCohort) -> None:
    demo.static.to_csv(folder / "static.csv", sep=";", index=False)
    with pytest.raises(DraftError, match="looks semicolon-separated"):
        draft_for_files(folder / "static.csv")
    (folder / "static.csv").write_text("id,a,a\n1,2,3\n", encoding="utf-8")
    with pytest.raises(DraftError, match=r"names a column more than once: \['a'\]"):
        draft_for_files(folder / "static.csv")
    with pytest.raises(DraftError, match="file not found"):
        draft_for_files(folder / "absent.csv")


def test_a_draft_without_timeseries_has_no_sequence(folder: Path) -> None:
    assert "sequence" not in tomllib.loads(draft_for_files(folder / "static.csv"))


def test_a_draft_is_the_same_for_a_different_cohort(folder: Path, draft: str, tmp_path: Path) -> None:
    # names and kinds only: another cohort with the same columns gives the very same text
    other = tmp_path / "other"
    write_cohort_folder(generate_demo_cohort(40, seed=99), other)
    assert draft_for_files(other / "static.csv", other / "timeseries.csv") == draft


def test_the_shipped_schema_is_what_a_filled_draft_declares(tmp_path: Path, draft: str) -> None:
    shipped = load_schema()
    filled = load_schema(_write(tmp_path, fill_placeholders(draft, shipped)))
    for ours, theirs in zip(filled.columns, shipped.columns, strict=True):
        assert (ours.name, ours.kind, ours.min, ours.max, ours.categories) == (
            theirs.name,
            theirs.kind,
            theirs.min,
            theirs.max,
            theirs.categories,
        )
    assert isinstance(filled, CohortSchema)
