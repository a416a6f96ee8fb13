"""Cohort schema: the typed declaration of every column a hospital's files carry."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs.errors import ConfigError, format_validation_error

DEFAULT_SCHEMA_PATH = Path(__file__).with_name("cohort.toml")
# How `mindfed init` marks a value it must not guess from the rows (a range, the categories):
# a schema holding one is a draft, refused until a person fills it from public knowledge.
PLACEHOLDER = "FILL ME"
# A wide draft has two per column: enough lines to show what is left, then a count.
MAX_LISTED_PLACEHOLDERS = 20
# Number of equal-width bins a numeric column's public range is cut into for the DP
# histograms; integers with a narrower range get one bin per value.
DEFAULT_NUMERIC_BINS = 20


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Frozen):
    """One static column: categorical with its categories, or numeric with [min, max]."""

    name: str = Field(min_length=1)
    kind: Literal["categorical", "continuous", "integer"]
    categories: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    unit: str = ""
    missing: Literal["refuse"] = "refuse"
    bins: int | None = Field(default=None, ge=2, le=200)
    # An integer column whose values come in steps (a DASS-21 subscale is a doubled sum: 0, 2, ..,
    # 42): public knowledge, so bins hold whole values and synthetic values land on real ones.
    step: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _check_kind_fields(self) -> ColumnSpec:
        if self.kind == "categorical":
            if not self.categories or len(self.categories) < 2:
                raise ValueError(f"categorical column '{self.name}' needs at least 2 categories")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError(f"categorical column '{self.name}' repeats a category")
            if self.min is not None or self.max is not None:
                raise ValueError(f"categorical column '{self.name}' takes no min/max")
        else:
            if self.min is None or self.max is None:
                raise ValueError(f"{self.kind} column '{self.name}' needs min and max")
            if not self.min < self.max:
                raise ValueError(f"column '{self.name}': min ({self.min}) must be below max")
            if self.categories is not None:
                raise ValueError(f"{self.kind} column '{self.name}' takes no categories")
            if self.kind == "integer" and not (float(self.min).is_integer() and float(self.max).is_integer()):
                raise ValueError(f"integer column '{self.name}' needs whole-number min and max")
            if self.step is not None and (self.kind != "integer" or (self.max - self.min) % self.step):
                raise ValueError(
                    f"column '{self.name}': step needs an integer column whose max - min it divides"
                )
        return self

    @property
    def is_categorical(self) -> bool:
        return self.kind == "categorical"

    def bin_edges(self) -> np.ndarray:
        """Public bin edges of a numeric column (derived from the schema, never from rows)."""
        assert self.min is not None and self.max is not None
        if self.kind == "integer":
            step = self.step or 1
            span = int(self.max - self.min) // step + 1  # the values a row can take
            n_bins = self.bins or min(span, DEFAULT_NUMERIC_BINS)
            if n_bins >= span:  # one bin per value, edges halfway between them
                return np.arange(self.min - step / 2, self.max + step, step)
            return np.linspace(self.min - step / 2, self.max + step / 2, n_bins + 1)
        return np.linspace(self.min, self.max, (self.bins or DEFAULT_NUMERIC_BINS) + 1)

    def n_cells(self) -> int:
        """Number of histogram cells: categories, or numeric bins."""
        return len(self.categories) if self.categories else len(self.bin_edges()) - 1


class ChannelSpec(_Frozen):
    """One daily wearable channel with its public range and how models scale it."""

    name: str = Field(min_length=1)
    min: float
    max: float
    unit: str = ""
    # "log": models see log(1 + value - min) / log(1 + max - min) instead of a linear map of
    # [min, max]. A public choice for right-skewed channels (step counts, HRV): linearly scaled,
    # most of their mass sits in a sliver of [0, 1] and a Gaussian-like generator misses the tail.
    scale: Literal["linear", "log"] = "linear"
    # Typical day-to-day standard deviation of one person's value, from public knowledge (the
    # literature, the device maker), never from the cohort: in the channel's unit, or for a log
    # channel as a fraction of the value (0.3: days vary by about 30%). It sets the scale of the DP
    # release of the within-week rhythm: deviations are measured in these units before clipping,
    # so a channel that varies little (resting heart rate) is not drowned by the noise sized for
    # one that varies a lot. A wrong guess costs accuracy, never privacy. None: 5% of the range.
    day_sd: float | None = Field(default=None, gt=0)
    # Typical spread of the weekly mean between people (same units and sources as day_sd). It
    # sets the scale of the DP release of how weekly levels vary and go together: measured on the
    # [0, 1] scale, the noise sized for stress swamped the narrow steps channel (between sd off
    # by 18%, and its links with it). A wrong guess costs accuracy, never privacy. None: 10% of
    # the range.
    week_sd: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check_range(self) -> ChannelSpec:
        if not self.min < self.max:
            raise ValueError(f"channel '{self.name}': min ({self.min}) must be below max")
        for field, value in (("day_sd", self.day_sd), ("week_sd", self.week_sd)):
            if value is not None and self.scale == "log" and value >= 1:
                raise ValueError(f"channel '{self.name}': a log channel's {field} is a fraction, below 1")
            if value is not None and self.scale == "linear" and value > self.max - self.min:
                raise ValueError(f"channel '{self.name}': {field} ({value}) exceeds the range")
        return self


class SequenceSpec(_Frozen):
    """The long-format daily table: day column, sequence length and channels."""

    day_column: str = "day"
    length: int = Field(ge=2, le=366)
    missing: Literal["refuse"] = "refuse"
    channels: tuple[ChannelSpec, ...] = Field(min_length=1)


class CohortSchema(_Frozen):
    """Every column of a cohort folder, as declared in `configs/cohort.toml`."""

    id_column: str = Field(min_length=1)
    label_column: str = Field(min_length=1)
    columns: tuple[ColumnSpec, ...] = Field(min_length=1)
    sequence: SequenceSpec | None = None

    @model_validator(mode="after")
    def _check_names(self) -> CohortSchema:
        names = [c.name for c in self.columns]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"column names repeat: {duplicates}")
        if self.id_column in names:
            raise ValueError(f"id_column '{self.id_column}' must not also be a data column")
        if self.label_column not in names:
            raise ValueError(f"label_column '{self.label_column}' is not a declared column")
        if not self.column(self.label_column).is_categorical:
            raise ValueError(f"label_column '{self.label_column}' must be categorical")
        return self

    def column(self, name: str) -> ColumnSpec:
        for spec in self.columns:
            if spec.name == name:
                return spec
        raise KeyError(f"no column named '{name}' in the schema")

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def schema_hash(self) -> str:
        """SHA-256 of the canonical JSON form: two sites agree on a schema iff hashes match."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_schema(path: str | Path = DEFAULT_SCHEMA_PATH) -> CohortSchema:
    """Read and validate a cohort schema TOML file; errors name the file and the key."""
    data = read_toml(path)
    unfilled = placeholders(data)
    if unfilled:
        more = len(unfilled) - MAX_LISTED_PLACEHOLDERS
        listed = "\n  ".join(unfilled[:MAX_LISTED_PLACEHOLDERS]) + (
            f"\n  ... and {more} more" if more > 0 else ""
        )
        raise ConfigError(
            f"{path} is a draft: fill its {PLACEHOLDER} placeholders from public knowledge "
            f"(questionnaire scoring guides, device specifications), never from the rows:\n  {listed}"
        )
    try:
        return CohortSchema.model_validate(data)
    except ValueError as err:
        raise ConfigError(format_validation_error(err, source=str(path))) from None


def placeholders(data: dict) -> list[str]:
    """One line per placeholder left in a schema's data, naming its column (or channel) and key."""
    found: list[str] = []

    def visit(table: dict, owner: str) -> None:
        for key, value in table.items():
            items = value if isinstance(value, list) else [value]
            if any(isinstance(item, str) and item.startswith(PLACEHOLDER) for item in items):
                found.append(f"{owner}: {key} is a placeholder, still to fill")
            for item in items:
                if isinstance(item, dict) and item is value:  # [sequence]
                    visit(item, key)
                elif isinstance(item, dict):  # [[columns]]: column 'age'; [[sequence.channels]]: channel
                    visit(item, f"{key.removesuffix('s')} {str(item.get('name', '?'))!r}")

    visit(data, "schema")
    return found


def read_toml(path: str | Path) -> dict:
    """Read a UTF-8 TOML file, turning I/O and syntax problems into a ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
