"""Tests for configs.schema: the shipped cohort schema, validation messages, bins and hashing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from configs.errors import ConfigError, format_validation_error
from configs.schema import (
    DEFAULT_NUMERIC_BINS,
    DEFAULT_SCHEMA_PATH,
    ChannelSpec,
    CohortSchema,
    ColumnSpec,
    load_schema,
    read_toml,
)

SHIPPED_COLUMNS = [
    "age",
    "gender",
    "occupation",
    "marital_status",
    "bmi",
    "dass_depression",
    "dass_anxiety",
    "dass_stress",
    "risk_level",
]

# A small valid schema; tests append or swap TOML fragments to break one thing at a time.
HEADER = 'id_column = "pid"\nlabel_column = "y"\n'
LABEL = '[[columns]]\nname = "y"\nkind = "categorical"\ncategories = ["a", "b"]\n'
AGE = '[[columns]]\nname = "age"\nkind = "integer"\nmin = 0\nmax = 10\n'
SEQUENCE = (
    '[sequence]\nday_column = "day"\nlength = 3\n'
    '[[sequence.channels]]\nname = "sleep"\nmin = 0.0\nmax = 14.0\n'
)


def _write(tmp_path: Path, text: str, name: str = "schema.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problem_lines(err: ConfigError) -> list[str]:
    """The per-key lines of a formatted validation error (header line dropped)."""
    return [line.strip() for line in str(err).splitlines()[1:]]


# ---------------------------------------------------------------- the shipped schema
def test_shipped_schema_loads_with_its_declared_columns() -> None:
    schema = load_schema()
    assert schema == load_schema(DEFAULT_SCHEMA_PATH)
    assert schema.id_column == "patient_id"
    assert schema.label_column == "risk_level"
    assert schema.column_names == SHIPPED_COLUMNS
    assert schema.column("risk_level").categories == ("low", "moderate", "high")
    assert schema.column("age").kind == "integer"
    assert (schema.column("age").min, schema.column("age").max) == (18, 90)
    assert schema.column("bmi").kind == "continuous"
    assert schema.sequence is not None
    assert schema.sequence.day_column == "day"
    assert schema.sequence.length == 7
    assert [c.name for c in schema.sequence.channels] == [
        "sleep_hours",
        "resting_hr",
        "hrv_ms",
        "stress_score",
        "steps",
    ]


def test_shipped_schema_is_frozen() -> None:
    schema = load_schema()
    with pytest.raises(ValidationError):
        schema.label_column = "gender"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        schema.column("age").max = 120  # type: ignore[misc]


def test_column_lookup_of_unknown_name_raises_key_error() -> None:
    with pytest.raises(KeyError, match="no column named 'nope'"):
        load_schema().column("nope")


def test_minimal_schema_loads(tmp_path: Path) -> None:
    schema = load_schema(_write(tmp_path, HEADER + LABEL + AGE + SEQUENCE))
    assert schema.column_names == ["y", "age"]
    assert schema.sequence is not None and schema.sequence.length == 3
    assert load_schema(_write(tmp_path, HEADER + LABEL + AGE)).sequence is None


# ---------------------------------------------------------------- validation errors name the key
BROKEN_SCHEMAS = {
    "categorical without categories": (
        HEADER + LABEL + '[[columns]]\nname = "mood"\nkind = "categorical"\n',
        ["columns.1", "'mood'", "at least 2 categories"],
    ),
    "categorical with one category": (
        HEADER + LABEL + '[[columns]]\nname = "mood"\nkind = "categorical"\ncategories = ["x"]\n',
        ["columns.1", "'mood'", "at least 2 categories"],
    ),
    "categorical repeats a category": (
        HEADER + LABEL + '[[columns]]\nname = "mood"\nkind = "categorical"\ncategories = ["x", "x"]\n',
        ["columns.1", "'mood'", "repeats a category"],
    ),
    "categorical with a range": (
        HEADER + LABEL + '[[columns]]\nname = "mood"\nkind = "categorical"\n'
        'categories = ["x", "z"]\nmin = 0\nmax = 1\n',
        ["columns.1", "'mood'", "takes no min/max"],
    ),
    "min equal to max": (
        HEADER + LABEL + '[[columns]]\nname = "age"\nkind = "integer"\nmin = 5\nmax = 5\n',
        ["columns.1", "'age'", "min (5.0) must be below max"],
    ),
    "min above max": (
        HEADER + LABEL + '[[columns]]\nname = "bmi"\nkind = "continuous"\nmin = 50.0\nmax = 14.0\n',
        ["columns.1", "'bmi'", "must be below max"],
    ),
    "numeric without max": (
        HEADER + LABEL + '[[columns]]\nname = "bmi"\nkind = "continuous"\nmin = 14.0\n',
        ["columns.1", "'bmi'", "needs min and max"],
    ),
    "integer with fractional bounds": (
        HEADER + LABEL + '[[columns]]\nname = "age"\nkind = "integer"\nmin = 0.5\nmax = 3.7\n',
        ["columns.1", "'age'", "whole-number min and max"],
    ),
    "numeric with categories": (
        HEADER + LABEL + '[[columns]]\nname = "age"\nkind = "integer"\nmin = 0\nmax = 9\n'
        'categories = ["a", "b"]\n',
        ["columns.1", "'age'", "takes no categories"],
    ),
    "unknown kind": (
        HEADER + LABEL + '[[columns]]\nname = "age"\nkind = "ordinal"\nmin = 0\nmax = 9\n',
        ["columns.1.kind", "ordinal"],
    ),
    "unknown column key": (
        HEADER + LABEL + AGE.replace("max = 10\n", "max = 10\ncolour = 'red'\n"),
        ["columns.1.colour", "Extra inputs are not permitted"],
    ),
    "too few bins": (
        HEADER + LABEL + AGE + "bins = 1\n",
        ["columns.1.bins", "greater than or equal to 2"],
    ),
    "label column not declared": (
        HEADER.replace('"y"', '"outcome"') + LABEL + AGE,
        ["label_column 'outcome' is not a declared column"],
    ),
    "label column not categorical": (
        HEADER.replace('"y"', '"age"') + LABEL + AGE,
        ["label_column 'age' must be categorical"],
    ),
    "duplicate column names": (
        HEADER + LABEL + AGE + AGE,
        ["column names repeat", "'age'"],
    ),
    "id column also a data column": (
        HEADER.replace('"pid"', '"age"') + LABEL + AGE,
        ["id_column 'age' must not also be a data column"],
    ),
    "no columns": (
        HEADER + "columns = []\n",
        ["columns", "at least 1 item"],
    ),
    "missing id_column": (
        'label_column = "y"\n' + LABEL,
        ["id_column", "Field required"],
    ),
    "sequence too short": (
        HEADER + LABEL + AGE + SEQUENCE.replace("length = 3", "length = 1"),
        ["sequence.length", "greater than or equal to 2"],
    ),
    "channel min not below max": (
        HEADER + LABEL + AGE + SEQUENCE.replace("max = 14.0", "max = 0.0"),
        ["sequence.channels.0", "'sleep'", "must be below max"],
    ),
    "sequence without channels": (
        HEADER + LABEL + AGE + '[sequence]\nday_column = "day"\nlength = 3\nchannels = []\n',
        ["sequence.channels", "at least 1 item"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SCHEMAS))
def test_invalid_schema_raises_config_error_naming_file_and_key(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN_SCHEMAS[case]
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_schema(path)
    message = str(info.value)
    assert str(path) in message.splitlines()[0]
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_problem_lines_start_with_the_dotted_key(tmp_path: Path) -> None:
    text = HEADER + LABEL + AGE.replace('kind = "integer"', 'kind = "ordinal"') + "bins = 1\n"
    with pytest.raises(ConfigError) as info:
        load_schema(_write(tmp_path, text))
    lines = _problem_lines(info.value)
    assert any(line.startswith("columns.1.kind:") for line in lines), lines
    assert any(line.startswith("columns.1.bins:") for line in lines), lines
    assert any("(got 'ordinal')" in line for line in lines), lines


def test_format_validation_error_passes_plain_errors_through() -> None:
    assert format_validation_error(ValueError("boom"), source="here.toml") == "here.toml: boom"


# ---------------------------------------------------------------- unreadable files
def test_missing_schema_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_schema(path)
    assert str(path) in str(info.value)


def test_non_utf8_schema_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes((HEADER + LABEL).encode("utf-8") + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_schema(path)
    assert str(path) in str(info.value)


def test_broken_toml_schema_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + '[[columns]\nname = "y"\n')
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_schema(path)
    assert str(path) in str(info.value)


def test_read_toml_of_a_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_toml(tmp_path)


# ---------------------------------------------------------------- bins and cells
def test_integer_narrow_range_gets_one_bin_per_value() -> None:
    spec = ColumnSpec(name="x", kind="integer", min=0, max=10)
    edges = spec.bin_edges()
    np.testing.assert_allclose(edges, np.arange(-0.5, 11.0, 1.0))
    assert spec.n_cells() == 11
    # every integer of the range sits in the middle of its own bin
    values = np.arange(0, 11)
    np.testing.assert_array_equal(np.histogram(values, bins=edges)[0], np.ones(11))


def test_integer_wide_range_gets_default_number_of_bins() -> None:
    spec = ColumnSpec(name="age", kind="integer", min=18, max=90)
    edges = spec.bin_edges()
    assert spec.n_cells() == DEFAULT_NUMERIC_BINS
    assert len(edges) == DEFAULT_NUMERIC_BINS + 1
    assert edges[0] == pytest.approx(17.5)
    assert edges[-1] == pytest.approx(90.5)
    np.testing.assert_allclose(np.diff(edges), (90.5 - 17.5) / DEFAULT_NUMERIC_BINS)


def test_integer_range_equal_to_default_bins_is_one_per_value() -> None:
    spec = ColumnSpec(name="x", kind="integer", min=1, max=DEFAULT_NUMERIC_BINS)
    assert spec.n_cells() == DEFAULT_NUMERIC_BINS
    np.testing.assert_allclose(np.diff(spec.bin_edges()), 1.0)


def test_integer_explicit_bins() -> None:
    spec = ColumnSpec(name="x", kind="integer", min=0, max=10, bins=5)
    np.testing.assert_allclose(spec.bin_edges(), np.linspace(-0.5, 10.5, 6))
    assert spec.n_cells() == 5
    # more bins than values falls back to one bin per value
    many = ColumnSpec(name="x", kind="integer", min=0, max=10, bins=50)
    assert many.n_cells() == 11
    np.testing.assert_allclose(many.bin_edges(), np.arange(-0.5, 11.0, 1.0))


def test_continuous_bins() -> None:
    spec = ColumnSpec(name="bmi", kind="continuous", min=14.0, max=50.0)
    np.testing.assert_allclose(spec.bin_edges(), np.linspace(14.0, 50.0, DEFAULT_NUMERIC_BINS + 1))
    assert spec.n_cells() == DEFAULT_NUMERIC_BINS
    four = ColumnSpec(name="bmi", kind="continuous", min=-1.0, max=1.0, bins=4)
    np.testing.assert_allclose(four.bin_edges(), [-1.0, -0.5, 0.0, 0.5, 1.0])
    assert four.n_cells() == 4


def test_categorical_cells_are_its_categories() -> None:
    spec = ColumnSpec(name="g", kind="categorical", categories=("a", "b", "c"))
    assert spec.is_categorical
    assert spec.n_cells() == 3


def test_every_shipped_column_has_consistent_cells() -> None:
    schema = load_schema()
    for spec in schema.columns:
        if spec.is_categorical:
            assert spec.n_cells() == len(spec.categories or ())
            continue
        edges = spec.bin_edges()
        assert spec.n_cells() == len(edges) - 1 >= 2
        assert np.all(np.diff(edges) > 0)
        assert edges[0] <= spec.min and edges[-1] >= spec.max


def test_channel_spec_range_checked() -> None:
    with pytest.raises(ValidationError, match="must be below max"):
        ChannelSpec(name="hr", min=10, max=10)


# ---------------------------------------------------------------- schema hash
def test_schema_hash_is_stable_and_hex() -> None:
    first, second = load_schema().schema_hash(), load_schema().schema_hash()
    assert first == second
    assert len(first) == 64 and int(first, 16) >= 0


def test_schema_hash_ignores_toml_formatting(tmp_path: Path) -> None:
    original = DEFAULT_SCHEMA_PATH.read_text(encoding="utf-8")
    reformatted = "# a comment added by a site\n\n" + original.replace(" = ", "   =   ")
    assert load_schema(_write(tmp_path, reformatted)).schema_hash() == load_schema().schema_hash()


def test_schema_hash_ignores_key_order_inside_a_table(tmp_path: Path) -> None:
    swapped = AGE.replace("min = 0\nmax = 10\n", "max = 10\nmin = 0\n")
    a = load_schema(_write(tmp_path, HEADER + LABEL + AGE, "a.toml"))
    b = load_schema(_write(tmp_path, HEADER + LABEL + swapped, "b.toml"))
    assert a.schema_hash() == b.schema_hash()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('categories = ["low", "moderate", "high"]', 'categories = ["low", "medium", "high"]'),
        ("max = 90", "max = 91"),
        ('unit = "kg/m2"', 'unit = "kg/m^2"'),
        ("length = 7", "length = 8"),
        ('id_column = "patient_id"', 'id_column = "pid"'),
    ],
)
def test_schema_hash_changes_with_any_change(tmp_path: Path, old: str, new: str) -> None:
    original = DEFAULT_SCHEMA_PATH.read_text(encoding="utf-8")
    assert original.count(old) == 1
    changed = load_schema(_write(tmp_path, original.replace(old, new)))
    assert changed.schema_hash() != load_schema().schema_hash()


def test_schema_hash_depends_on_column_order() -> None:
    a = CohortSchema(
        id_column="pid",
        label_column="y",
        columns=(
            ColumnSpec(name="y", kind="categorical", categories=("a", "b")),
            ColumnSpec(name="x", kind="continuous", min=0, max=1),
        ),
    )
    b = CohortSchema(id_column="pid", label_column="y", columns=tuple(reversed(a.columns)))
    assert a.schema_hash() != b.schema_hash()
    assert a.schema_hash() == CohortSchema.model_validate(a.model_dump()).schema_hash()
