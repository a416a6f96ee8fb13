"""Read a cohort's CSVs for `mindfed init`: the header and each column's value type, no value."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd

from client.data import ValidationIssue, read_table
from configs.schema_draft import DraftColumn, DraftError, Kind, draft_schema

# A value's type is read from its text alone: no number is computed, compared or kept.
_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def value_kind(values: pd.Series) -> Kind | None:
    """What every non-empty value of a column reads as (None: it has none)."""
    present = values.str.strip()
    present = present[present != ""]
    if present.empty:
        return None
    if present.str.fullmatch(_INTEGER.pattern).all():
        return "integer"
    if present.str.fullmatch(_NUMBER.pattern).all():
        return "continuous"
    return "categorical"


def draft_for_files(static: Path, timeseries: Path | None = None) -> str:
    """The schema draft of a static CSV and, optionally, its timeseries CSV."""
    sequence = None if timeseries is None else _columns(timeseries)
    return draft_schema(
        _columns(static),
        sequence,
        static_source=static.name,
        timeseries_source=timeseries.name if timeseries is not None else "timeseries.csv",
    )


def _columns(path: Path) -> list[DraftColumn]:
    """Each column's name, from the header as written, and the type of its values."""
    if not path.is_file():
        raise DraftError(f"{path}: file not found")
    issues: list[ValidationIssue] = []
    frame = read_table(path, issues)
    if frame is None or issues:
        raise DraftError(f"cannot draft a schema from {path}:\n" + "\n".join(f"  - {i}" for i in issues))
    names = list(frame.columns) if path.suffix == ".parquet" else _header(path)
    if len(names) != len(frame.columns):
        raise DraftError(f"{path}: the header has {len(names)} names for {len(frame.columns)} columns")
    return [(name, value_kind(frame.iloc[:, i])) for i, name in enumerate(names)]


def _header(path: Path) -> list[str]:
    """A CSV's header names as written: pandas renames a repeat ("age", "age.1"), which the draft
    must refuse rather than turn into two columns."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader(handle), [])
    except csv.Error as err:  # e.g. a header cell beyond the csv module's field size limit
        raise DraftError(f"{path}: the header cannot be read: {err}") from None
