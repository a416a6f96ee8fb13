"""Editing a data-contract CSV cell by line and column, as a hospital's file would go wrong."""

from __future__ import annotations

from pathlib import Path


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def save_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def cell(path: Path, line: int, column: str) -> str:
    """One cell's text; `line` is the 1-based line in the file (the header is line 1)."""
    lines = lines_of(path)
    return lines[line - 1].split(",")[lines[0].split(",").index(column)]


def set_cell(path: Path, line: int, column: str, value: str) -> None:
    """Overwrite one cell; `line` is the 1-based line in the file (the header is line 1)."""
    lines = lines_of(path)
    index = lines[0].split(",").index(column)
    cells = lines[line - 1].split(",")
    cells[index] = value
    lines[line - 1] = ",".join(cells)
    save_lines(path, lines)
