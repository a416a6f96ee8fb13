"""The report pages' building blocks: the inline style sheet, escaped tables, inline images, a page."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr.pass td:last-child, span.pass { color: #1a7f37; font-weight: bold; }
tr.fail td:last-child, span.fail { color: #b42318; font-weight: bold; }
tr.rollback { background: #fdecea; } tr.accept { background: #edf7ee; } tr.filter { background: #eef3fb; }
.grid { display: flex; flex-wrap: wrap; gap: 0.6em; }
.banner { font-size: 1.3em; padding: 0.4em 0.8em; display: inline-block; border-radius: 4px; }
.banner.pass { background: #edf7ee; } .banner.fail { background: #fdecea; }
.note { color: #555; font-size: 0.9em; }
"""


def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {format_cell(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list | tuple):
        return ", ".join(format_cell(v) for v in value) or "–"
    return str(value)


def html_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    element_id: str | None = None,
    row_classes: Sequence[str] | None = None,
) -> str:
    """An HTML table: headers and every cell escaped, numbers to 4 significant digits."""
    ident = f' id="{html.escape(element_id)}"' if element_id else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{html.escape(row_classes[i])}"' if row_classes else ""
        cells = "".join(f"<td>{html.escape(format_cell(c))}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_img(b64: str, alt: str) -> str:
    """An inline <img> of a base64 PNG (the page loads nothing from anywhere)."""
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def html_page(title: str, body: str) -> str:
    """A self-contained page: the style sheet inline, `body` as given (already escaped), title escaped."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )
