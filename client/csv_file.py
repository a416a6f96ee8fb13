"""File-level checks of a cohort CSV: its separator, NUL characters, overlong cells, control characters."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

# A cell quoted in a message is cut here: a 40 MB cell must never become a 40 MB string.
MAX_QUOTED_CHARS = 40
# Ids, numbers and categories are short. A longer cell is a broken export (a missing closing
# quote swallows the rest of the file), and refusing it before any value is parsed keeps it off
# paths that are slow on huge strings (a 40 MB cell took over 100 s to be refused without it).
MAX_CELL_CHARS = 1_000

# What a spreadsheet may separate cells with instead of a comma (its locale's list separator).
_OTHER_SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe"}

# C0 and C1 control characters (Unicode category Cc): invisible in a terminal or a spreadsheet,
# so two ids differing only by one look the same, and some (ESC) drive the terminal showing them.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class CellProblem(NamedTuple):
    """A problem found in a file: where (line, column), what, and its class in client.data's list."""

    line: int | None
    column: str | None
    problem: str
    problem_class: str


def clip(text: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` as a string of at most `limit` characters, an ellipsis marking a cut."""
    shown = str(text)
    return shown if len(shown) <= limit else shown[: max(limit - 3, 0)] + "..."


def text_problems(text: str) -> list[CellProblem]:
    """The problems of a CSV file's text that parsing would hide; none: it may be parsed."""
    end = text.find("\n")
    header = (text if end < 0 else text[:end]).rstrip("\r")
    hint = separator_hint(header)
    if hint is not None:
        # Read with commas, the whole header is one column: name it (cut) rather than list
        # every declared column as missing.
        return [CellProblem(1, clip(header), hint, "not comma-separated")]
    nul = find_nul(text)
    if nul is not None:
        names = header.split(",")
        column = clip(names[nul.field]) if nul.field < len(names) else None
        problem = (
            f"NUL character at character {nul.position} of the cell ({nul.count} in the file): "
            "a broken export, or not UTF-8 (UTF-16?)"
        )
        return [CellProblem(nul.line, column, problem, "NUL character")]
    return []


def overlong_cells(frame: pd.DataFrame, columns: list[str]) -> list[CellProblem]:
    """Every cell of `columns` longer than MAX_CELL_CHARS, on its line (the frame's index)."""
    problems = []
    for column in columns:
        for i in overlong(frame[column]):
            raw = frame[column].iloc[i]
            problem = f"cell of {len(raw):,} characters (at most {MAX_CELL_CHARS:,}): '{clip(raw)}'"
            problems.append(CellProblem(int(frame.index[i]), column, problem, "cell too long"))
    return problems


def id_problems(raw: pd.Series, column: str) -> list[CellProblem]:
    """Every id of `raw` (not yet stripped) that holds a control character."""
    return [
        CellProblem(
            int(raw.index[i]),
            column,
            f"identifier holds a {describe_control_character(raw.iloc[i])}",
            "control character",
        )
        for i in with_control_character(raw)
    ]


def separator_hint(header: str) -> str | None:
    """Why a header with no comma looks separated by another character; None if it does not."""
    if "," in header:
        return None
    separator, count = max(((s, header.count(s)) for s in _OTHER_SEPARATORS), key=lambda item: item[1])
    if count == 0:
        return None  # one column and no separator at all: the column checks say what is missing
    name = _OTHER_SEPARATORS[separator]
    return (
        f"looks {name}-separated: the header has {count} {name}{'s' if count > 1 else ''} "
        "and no comma; export the file with ',' as the separator"
    )


@dataclass(frozen=True)
class NulCharacter:
    """Where the first NUL character of a file is, and how many the file holds."""

    line: int  # 1-based line in the file (the header is line 1)
    field: int  # 0-based field of that line
    position: int  # 1-based character in that field
    count: int


def find_nul(text: str) -> NulCharacter | None:
    """The first NUL of `text`, or None: pandas' parser silently cuts a cell at a NUL."""
    at = text.find("\x00")
    if at < 0:
        return None
    start = text.rfind("\n", 0, at) + 1
    before = text[start:at]
    if '"' not in before:  # the common case, without a Python loop over a possibly huge line
        field, field_start = before.count(","), start + before.rfind(",") + 1
    else:  # commas inside quotes separate nothing
        field, field_start, quoted = 0, start, False
        for offset, char in enumerate(before):
            if char == '"':
                quoted = not quoted
            elif char == "," and not quoted:
                field, field_start = field + 1, start + offset + 1
    return NulCharacter(text.count("\n", 0, at) + 1, field, at - field_start + 1, text.count("\x00"))


def overlong(values: pd.Series, limit: int = MAX_CELL_CHARS) -> np.ndarray:
    """Positions of the cells of `values` longer than `limit` characters."""
    return np.flatnonzero(values.str.len().to_numpy() > limit)


def with_control_character(values: pd.Series) -> np.ndarray:
    """Positions of the cells of `values` that hold a control character."""
    return np.flatnonzero(values.str.contains(CONTROL_CHARACTER.pattern, regex=True).to_numpy())


def describe_control_character(value: str) -> str:
    """Which control character `value` holds first, and where, without echoing it."""
    found = CONTROL_CHARACTER.search(value)
    if found is None:
        return "no control character"
    return f"control character U+{ord(found.group()):04X} at character {found.start() + 1}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as a visible \\xNN escape."""
    return CONTROL_CHARACTER.sub(lambda found: f"\\x{ord(found.group()):02x}", text)
