"""Filling a `mindfed init` draft's placeholders from a schema's public values, as a person would."""

from __future__ import annotations

import json
import re

from configs.schema import PLACEHOLDER, CohortSchema

_NAME = re.compile(r'^name = "(?P<name>[^"]*)"$')
_PLACEHOLDER_LINE = re.compile(rf'^(?P<key>\w+) = "{PLACEHOLDER}[^"]*"$')


def fill_placeholders(draft: str, schema: CohortSchema) -> str:
    """`draft` with each placeholder line replaced by the value `schema` gives that key."""
    lines, table, name = [], "", ""
    for line in draft.splitlines():
        if line.startswith("["):
            table, name = line, ""
        elif found := _NAME.match(line):
            name = found["name"]
        elif found := _PLACEHOLDER_LINE.match(line):
            key = found["key"]
            if table == "[sequence]":
                assert schema.sequence is not None
                value = getattr(schema.sequence, key)
            elif table == "[[sequence.channels]]":
                assert schema.sequence is not None
                value = getattr(next(c for c in schema.sequence.channels if c.name == name), key)
            else:
                value = getattr(schema.column(name), key)
            line = f"{key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}"
        lines.append(line)
    return "\n".join(lines) + "\n"
