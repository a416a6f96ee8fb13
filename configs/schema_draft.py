"""A cohort schema draft from the files' headers and value types: names and kinds, never values."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from configs.schema import PLACEHOLDER

Kind = Literal["integer", "continuous", "categorical"]
# A column's name and the type its values were read as (None: no value to tell from).
DraftColumn = tuple[str, Kind | None]

# Names that say what a column is; a name that says nothing falls back on the column's position.
_ID_NAME = re.compile(r"(^|[_ .-])(id|identifier|pid|subject|patient)$", re.IGNORECASE)
_LABEL_NAMES = frozenset({"label", "target", "outcome", "class", "y", "diagnosis"})
_DAY_NAME = re.compile(r"(^|[_ .-])day($|[_ .-])", re.IGNORECASE)

_KIND_WHY = {
    "integer": "its values read as whole numbers",
    "continuous": "its values read as numbers",
    "categorical": "its values read as text",
    None: "it holds no value to tell from",
}

# Every line of the preamble: why the draft holds names and kinds only.
_PREAMBLE = f"""\
# MindFed cohort schema DRAFT, written by `mindfed init`.
#
# Taken from the files: the column names (their headers) and each column's kind (integer,
# continuous or categorical, from whether its values read as whole numbers, numbers or text).
# NOT taken from the files: ranges and categories. Every "{PLACEHOLDER}" below must be replaced
# with public knowledge (the questionnaire's scoring guide, the device's specification, the study's
# codebook). Taken from the rows they would leak records: the highest age of a cohort is one
# patient's age, and a rare category points at the few patients who have it. Encoders and the
# privacy-protected statistics are built from this file alone: it must say nothing about anyone.
# MindFed refuses to load this file while any "{PLACEHOLDER}" is left.
#
# Check every guess marked below. Optional keys (unit, bins, step; a channel's scale, day_sd,
# week_sd) are described in the shipped configs/cohort.toml.
"""


class DraftError(ValueError):
    """The headers cannot make a schema (a repeated name, no id column in the timeseries)."""


def draft_schema(
    static: Sequence[DraftColumn],
    timeseries: Sequence[DraftColumn] | None = None,
    *,
    static_source: str = "static.csv",
    timeseries_source: str = "timeseries.csv",
) -> str:
    """The TOML text of a schema draft: names and kinds, placeholders for every range and category."""
    names = [name for name, _ in static]
    _refuse_repeats(names, static_source)
    if len(names) < 3:
        raise DraftError(f"{static_source} has {len(names)} columns: a schema needs an id, a label and data")
    id_column, id_why = _guess_id(names, static_source)
    data = [(name, kind) for name, kind in static if name != id_column]
    label, label_why = _guess_label([name for name, _ in data], static_source)
    lines = [
        _PREAMBLE,
        f"id_column = {_toml_string(id_column)}  # {id_why}; check",
        f"label_column = {_toml_string(label)}  # {label_why}; check",
    ]
    for name, kind in data:
        lines += ["", *_column(name, kind, is_label=name == label)]
    if timeseries is not None:
        lines += ["", *_sequence(timeseries, id_column, timeseries_source)]
    return "\n".join(lines) + "\n"


def _column(name: str, kind: Kind | None, *, is_label: bool) -> list[str]:
    lines = ["[[columns]]", f"name = {_toml_string(name)}"]
    if is_label:
        # A schema's label is a class: categorical even when its classes are coded as numbers.
        return [
            *lines,
            'kind = "categorical"  # the label: classes, whatever its values look like',
            _placeholder("categories", "every class of the label, as a list of strings (the study protocol)"),
        ]
    shown = kind or "categorical"
    lines.append(f"kind = {_toml_string(shown)}  # {_KIND_WHY[kind]}; check")
    if shown == "categorical":
        return [
            *lines,
            _placeholder("categories", "every category the codebook allows, as a list of strings"),
        ]
    return [
        *lines,
        _placeholder("min", "the lowest value the measure can take (its scoring guide or specification)"),
        _placeholder("max", "the highest value the measure can take (its scoring guide or specification)"),
    ]


def _sequence(columns: Sequence[DraftColumn], id_column: str, source: str) -> list[str]:
    names = [name for name, _ in columns]
    _refuse_repeats(names, source)
    if id_column not in names:
        raise DraftError(
            f"{source} has no column {id_column!r}, the id column of the static table: both files must "
            "name the patient id alike"
        )
    rest = [name for name in names if name != id_column]
    if len(rest) < 2:
        raise DraftError(f"{source} needs a day column and at least one channel besides {id_column!r}")
    named = [name for name in rest if _DAY_NAME.search(name)]
    day, day_why = (
        (named[0], "guessed from its name") if named else (rest[0], "guessed: the column after the id")
    )
    lines = [
        "[sequence]",
        f"day_column = {_toml_string(day)}  # {day_why}; check (days are numbered from one to length)",
        _placeholder("length", "the number of days per patient (the study protocol)"),
        'missing = "refuse"',
    ]
    for name, kind in columns:
        if name in (id_column, day):
            continue
        lines += ["", "[[sequence.channels]]", f"name = {_toml_string(name)}"]
        if kind not in ("integer", "continuous"):
            lines.append(f"# {_KIND_WHY[kind]}, and a channel is a number: check this column")
        lines += [
            _placeholder("min", "the lowest value the device can report (its specification)"),
            _placeholder("max", "the highest value the device can report (its specification)"),
        ]
    return lines


def _guess_id(names: list[str], source: str) -> tuple[str, str]:
    named = [name for name in names if _ID_NAME.search(name)]
    if named:
        return named[0], "guessed from its name"
    return names[0], f"guessed: the first column of {source}"


def _guess_label(names: list[str], source: str) -> tuple[str, str]:
    named = [name for name in names if name.strip().lower() in _LABEL_NAMES]
    if named:
        return named[0], "guessed from its name"
    return names[-1], f"guessed: the last column of {source}"


def _refuse_repeats(names: list[str], source: str) -> None:
    if any(not name.strip() for name in names):
        raise DraftError(f"{source} has a column with no name in its header")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DraftError(f"{source} names a column more than once: {repeated}")


def _placeholder(key: str, what: str) -> str:
    return f"{key} = {_toml_string(f'{PLACEHOLDER}: {what}')}"


def _toml_string(text: str) -> str:
    """`text` as a TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + re.sub(r"[\x00-\x1f\x7f]", lambda found: f"\\u{ord(found.group()):04x}", escaped) + '"'
