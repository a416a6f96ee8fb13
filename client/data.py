"""Load a hospital's cohort folder and validate every cell against the schema."""

from __future__ import annotations

import hmac
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd

from client.csv_file import (
    MAX_QUOTED_CHARS,  # noqa: F401  (re-exported: callers cut quoted cells with it)
    CellProblem,
    clip,
    escape_controls,
    id_problems,
    overlong_cells,
    text_problems,
)
from configs.schema import CohortSchema, ColumnSpec

# Enough problems for a data team to see the pattern, without flooding the terminal.
MAX_REPORTED_ISSUES = 20
# Backstop for whole messages (library errors quoted in them included).
MAX_PROBLEM_CHARS = 300

# What kind of problem an issue is: the only description of it that leaves the hospital (see
# client.refusals), so a fixed vocabulary that can carry neither ids nor cell values.
ProblemClass = Literal[
    "folder not found",
    "file not found",
    "empty file",
    "not UTF-8",
    "unreadable file",
    "not a CSV table",
    "not comma-separated",
    "NUL character",
    "cell too long",
    "control character",
    "no data rows",
    "missing column",
    "unexpected column",
    "missing value",
    "not a number",
    "not finite",
    "not an integer",
    "out of range",
    "unknown category",
    "missing id",
    "duplicate id",
    "unknown id",
    "wrong number of days",
]
PROBLEM_CLASSES: frozenset[str] = frozenset(get_args(ProblemClass))
_UNUSABLE_ID = frozenset({"missing id", "control character"})


def _one_line(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with its control characters escaped."""
    return clip(escape_controls(str(text)[: limit + 1]), limit)


@dataclass(frozen=True)
class ValidationIssue:
    """One problem: where it is, its class (public) and a human detail (local: may name ids)."""

    file: str
    row: int | None  # 1-based line in the file (the header is line 1); None: the whole file
    column: str | None
    problem: str
    problem_class: ProblemClass

    def __post_init__(self) -> None:
        # Literal is not checked at run time, and refusals trust the class to be from the list.
        if self.problem_class not in PROBLEM_CLASSES:
            raise ValueError(f"unknown problem class {clip(self.problem_class)!r}")
        # One line per issue, whatever a cell held: control characters (a newline, an ESC that
        # would drive the terminal) are shown as escapes.
        object.__setattr__(self, "problem", _one_line(self.problem, MAX_PROBLEM_CHARS))
        if self.column is not None:
            object.__setattr__(self, "column", _one_line(self.column, MAX_PROBLEM_CHARS))

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f", line {self.row}"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: {self.problem}"


class CohortValidationError(ValueError):
    """The cohort folder does not satisfy the schema; the node refuses to train on it."""

    def __init__(self, folder: Path, issues: list[ValidationIssue]):
        self.folder = folder
        self.issues = issues
        shown = "\n".join(f"  - {issue}" for issue in issues[:MAX_REPORTED_ISSUES])
        more = len(issues) - MAX_REPORTED_ISSUES
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"cohort folder {folder} is invalid ({len(issues)} problem"
            f"{'s' if len(issues) != 1 else ''}); refusing to train:\n{shown}{tail}"
        )


@dataclass(frozen=True)
class Cohort:
    static: pd.DataFrame
    timeseries: pd.DataFrame | None

    @property
    def n_patients(self) -> int:
        return len(self.static)


def read_table(path: Path, issues: list[ValidationIssue]) -> pd.DataFrame | None:
    """Read CSV (as text, so we parse and report each cell ourselves) or parquet."""
    name = path.name
    if path.stat().st_size == 0:
        issues.append(ValidationIssue(name, None, None, "file is empty", "empty file"))
        return None
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path).astype(str).replace({"nan": "", "None": ""})
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        issues.append(ValidationIssue(name, None, None, f"not UTF-8 text (byte {err.start})", "not UTF-8"))
        return None
    except (OSError, ValueError, ImportError) as err:  # ImportError: no parquet engine installed
        issues.append(ValidationIssue(name, None, None, f"cannot be read: {err}", "unreadable file"))
        return None
    if not _add(issues, name, text_problems(text)):
        return None
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        issues.append(
            ValidationIssue(name, None, None, f"not a valid CSV table: {str(err).strip()}", "not a CSV table")
        )
        return None
    # The index becomes each row's line in the file (header = line 1), so every message points
    # at the right line even where blank lines were skipped.
    frame.index = np.arange(len(frame)) + 2
    frame = frame[~(frame == "").all(axis=1)]
    if frame.empty:
        issues.append(ValidationIssue(name, None, None, "has a header but no data rows", "no data rows"))
        return None
    return frame


def _add(issues: list[ValidationIssue], name: str, problems: list[CellProblem]) -> bool:
    """Record `problems` found in file `name` as issues; True when there were none."""
    issues.extend(ValidationIssue(name, *problem) for problem in problems)  # type: ignore[arg-type]
    return not problems


def _check_columns(frame: pd.DataFrame, name: str, expected: list[str], issues: list) -> bool:
    missing = [c for c in expected if c not in frame.columns]
    for column in missing:
        issues.append(ValidationIssue(name, 1, column, "required column is missing", "missing column"))
    extra = [c for c in frame.columns if c not in expected]
    for column in extra:
        # the name comes from the file's header, which may be a data row: cut like a cell
        issues.append(
            ValidationIssue(
                name, 1, clip(column), "column is not declared in the schema", "unexpected column"
            )
        )
    return not missing


def _parse_numeric(
    raw: pd.Series, *, name: str, column: str, low: float, high: float, integer: bool, issues: list
) -> np.ndarray:
    stripped = raw.str.strip()
    values = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64)
    lines = raw.index.to_numpy()
    for i in np.flatnonzero(stripped == ""):
        issues.append(ValidationIssue(name, int(lines[i]), column, "value is missing", "missing value"))
    bad = np.isnan(values) & (stripped != "").to_numpy()
    for i in np.flatnonzero(bad):
        issues.append(
            ValidationIssue(
                name, int(lines[i]), column, f"'{clip(raw.iloc[i])}' is not a number", "not a number"
            )
        )
    finite = np.isfinite(values)
    for i in np.flatnonzero(~finite & ~np.isnan(values)):
        issues.append(
            ValidationIssue(name, int(lines[i]), column, f"'{clip(raw.iloc[i])}' is not finite", "not finite")
        )
    if integer:
        for i in np.flatnonzero(finite & (values != np.round(values))):
            problem = f"{clip(raw.iloc[i])} is not an integer"
            issues.append(ValidationIssue(name, int(lines[i]), column, problem, "not an integer"))
    for i in np.flatnonzero(finite & ((values < low) | (values > high))):
        problem = f"{clip(raw.iloc[i])} is outside [{low:g}, {high:g}]"
        issues.append(ValidationIssue(name, int(lines[i]), column, problem, "out of range"))
    return values


def _parse_static_column(raw: pd.Series, spec: ColumnSpec, file_name: str, issues: list) -> pd.Series:
    if spec.is_categorical:
        allowed = set(spec.categories or ())
        values = raw.str.strip()
        for i in np.flatnonzero(~values.isin(allowed).to_numpy()):
            problem = f"'{clip(values.iloc[i] or '(empty)')}' is not one of {sorted(allowed)}"
            issues.append(
                ValidationIssue(file_name, int(raw.index[i]), spec.name, problem, "unknown category")
            )
        return values
    assert spec.min is not None and spec.max is not None
    values = _parse_numeric(
        raw,
        name=file_name,
        column=spec.name,
        low=spec.min,
        high=spec.max,
        integer=spec.kind == "integer",
        issues=issues,
    )
    return pd.Series(
        values.astype(np.int64) if spec.kind == "integer" and np.isfinite(values).all() else values,
        index=raw.index,
    )


def _find_static(folder: Path) -> Path | None:
    for candidate in ("static.csv", "static.parquet"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _load_static(
    folder: Path, schema: CohortSchema, issues: list, *, label_optional: bool = False
) -> pd.DataFrame | None:
    path = _find_static(folder)
    if path is None:
        issues.append(
            ValidationIssue("static.csv", None, None, "file not found in the cohort folder", "file not found")
        )
        return None
    frame = read_table(path, issues)
    columns = [schema.id_column, *schema.column_names]
    if frame is not None and label_optional and schema.label_column not in frame.columns:
        columns.remove(schema.label_column)  # patients to predict for: their label is not known yet
    if frame is None or not _check_columns(frame, path.name, columns, issues):
        return None
    if not _add(issues, path.name, overlong_cells(frame, columns)):
        return None
    _add(issues, path.name, id_problems(frame[schema.id_column], schema.id_column))
    parsed = {schema.id_column: frame[schema.id_column].str.strip()}
    for spec in (s for s in schema.columns if s.name in columns):
        parsed[spec.name] = _parse_static_column(frame[spec.name], spec, path.name, issues)
    ids = parsed[schema.id_column]
    for i in np.flatnonzero((ids == "").to_numpy()):
        issues.append(
            ValidationIssue(
                path.name, int(ids.index[i]), schema.id_column, "identifier is missing", "missing id"
            )
        )
    for i in np.flatnonzero(ids.duplicated().to_numpy() & (ids != "").to_numpy()):
        issues.append(
            ValidationIssue(
                path.name,
                int(ids.index[i]),
                schema.id_column,
                f"'{clip(ids.iloc[i])}' repeats",
                "duplicate id",
            )
        )
    return pd.DataFrame(parsed)


def _load_timeseries(
    folder: Path, schema: CohortSchema, patient_ids: pd.Series | None, issues: list
) -> pd.DataFrame | None:
    sequence = schema.sequence
    if sequence is None:
        return None
    path = folder / "timeseries.csv"
    if not path.is_file():
        issues.append(
            ValidationIssue(path.name, None, None, "file not found in the cohort folder", "file not found")
        )
        return None
    frame = read_table(path, issues)
    columns = [schema.id_column, sequence.day_column, *(c.name for c in sequence.channels)]
    if frame is None or not _check_columns(frame, path.name, columns, issues):
        return None
    if not _add(issues, path.name, overlong_cells(frame, columns)):
        return None
    ids_usable = _add(issues, path.name, id_problems(frame[schema.id_column], schema.id_column))
    parsed = {schema.id_column: frame[schema.id_column].str.strip()}
    parsed[sequence.day_column] = _parse_numeric(
        frame[sequence.day_column],
        name=path.name,
        column=sequence.day_column,
        low=1,
        high=sequence.length,
        integer=True,
        issues=issues,
    )
    for channel in sequence.channels:
        parsed[channel.name] = _parse_numeric(
            frame[channel.name],
            name=path.name,
            column=channel.name,
            low=channel.min,
            high=channel.max,
            integer=False,
            issues=issues,
        )
    result = pd.DataFrame(parsed)
    if patient_ids is not None and ids_usable:
        known = set(patient_ids)
        unknown = ~result[schema.id_column].isin(known).to_numpy()
        for i in np.flatnonzero(unknown)[:MAX_REPORTED_ISSUES]:
            issues.append(
                ValidationIssue(
                    path.name,
                    int(result.index[i]),
                    schema.id_column,
                    f"'{clip(result[schema.id_column].iloc[i])}' has no row in the static table",
                    "unknown id",
                )
            )
        days = result.groupby(schema.id_column)[sequence.day_column].nunique()
        rows = result.groupby(schema.id_column).size()
        for pid in sorted(known):
            if days.get(pid, 0) != sequence.length or rows.get(pid, 0) != sequence.length:
                issues.append(
                    ValidationIssue(
                        path.name,
                        None,
                        schema.id_column,
                        f"patient '{clip(pid)}' needs exactly {sequence.length} distinct days "
                        f"(missing policy '{sequence.missing}'), found {rows.get(pid, 0)} rows",
                        "wrong number of days",
                    )
                )
    return result


def load_cohort(folder: str | Path, schema: CohortSchema, *, label_optional: bool = False) -> Cohort:
    """Read and validate a cohort folder; any problem raises CohortValidationError, listing all.

    Args:
        label_optional: accept a static.csv without the label column (patients to predict for).
    """
    folder = Path(folder)
    if not folder.is_dir():
        issue = ValidationIssue(str(folder), None, None, "folder not found", "folder not found")
        raise CohortValidationError(folder, [issue])
    issues: list[ValidationIssue] = []
    static = _load_static(folder, schema, issues, label_optional=label_optional)
    # An unusable id would come back from the cross-file check once per day row of its patient:
    # it is reported once, and the files are matched when it is fixed.
    usable = static is not None and not any(i.problem_class in _UNUSABLE_ID for i in issues)
    ids = static[schema.id_column] if usable else None
    timeseries = _load_timeseries(folder, schema, ids, issues)
    if issues:
        raise CohortValidationError(folder, issues)
    assert static is not None
    if timeseries is not None:
        timeseries = timeseries.sort_values([schema.id_column, schema.sequence.day_column])  # type: ignore[union-attr]
        timeseries = timeseries.reset_index(drop=True)
    return Cohort(static=static.reset_index(drop=True), timeseries=timeseries)


def split_holdout(cohort: Cohort, *, share: float, id_column: str, salt: bytes) -> tuple[Cohort, Cohort]:
    """Members (trained on) and held-out non-members, by HMAC-SHA256(salt, patient id).

    The split depends on the id and the node's salt alone, so it is the same every round,
    restart and run, and a held-out patient never reaches training, statistics or the encoder.
    The salt is the node's secret: unsalted, anyone who knows an id could tell whether that
    patient was trained on.
    """
    if not isinstance(salt, bytes | bytearray):
        raise TypeError(f"the holdout salt must be bytes, got {type(salt).__name__}")
    if not salt:
        raise ValueError("the holdout salt is empty: the split needs the node's secret salt")
    key = bytes(salt)
    ids = cohort.static[id_column].astype(str)
    held = ids.map(lambda pid: _unit_interval(key, pid) < share).to_numpy(dtype=bool)
    return _subset(cohort, ~held, id_column), _subset(cohort, held, id_column)


def _unit_interval(key: bytes, patient_id: str) -> float:
    """A keyed, uniform draw in [0, 1) for one patient id."""
    return int.from_bytes(hmac.digest(key, patient_id.encode(), "sha256")[:8], "big") / 2**64


def _subset(cohort: Cohort, rows: np.ndarray, id_column: str) -> Cohort:
    static = cohort.static[rows].reset_index(drop=True)
    if cohort.timeseries is None:
        return Cohort(static=static, timeseries=None)
    keep = cohort.timeseries[id_column].isin(set(static[id_column]))
    return Cohort(static=static, timeseries=cohort.timeseries[keep].reset_index(drop=True))
