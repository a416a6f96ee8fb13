"""Configuration errors that name the offending key and say what is allowed."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the key."""


def format_validation_error(err: Exception, *, source: str) -> str:
    """Turn a pydantic ValidationError into one line per wrong key, dotted path first."""
    if not isinstance(err, ValidationError):
        return f"{source}: {err}"
    lines = [f"invalid configuration in {source}:"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        given = problem.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {problem['msg']}{shown}")
    return "\n".join(lines)
