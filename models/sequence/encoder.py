"""Long-format daily table <-> scaled weeks (patients, days, channels) in [0, 1], from the schema alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from configs.schema import CohortSchema, SequenceSpec
from models.encoder import EncoderError

# Day-to-day sd and between-people sd of the weekly mean on the [0, 1] scale assumed for a
# channel whose schema declares no `day_sd` / `week_sd`.
DEFAULT_DAY_SD = 0.05
DEFAULT_WEEK_SD = 0.1


class SequenceEncoder:
    """Long-format daily table <-> float32 (patients, length, channels) in [0, 1].

    Built from the schema's SequenceSpec alone: the scaling uses the declared public
    [min, max] of each channel (and its declared linear or log scale), so the encoder reveals
    nothing about anyone's rows.
    """

    def __init__(self, spec: SequenceSpec, *, id_column: str):
        self.spec = spec
        self.id_column = id_column
        self.day_column = spec.day_column
        self.length = spec.length
        self.channels = [c.name for c in spec.channels]
        self._low = np.array([c.min for c in spec.channels], dtype=np.float64)
        self._span = np.array([c.max - c.min for c in spec.channels], dtype=np.float64)
        # Channels declared `scale = "log"` are scaled as log1p(value - min) / log1p(max - min).
        self._log = np.array([c.scale == "log" for c in spec.channels])
        self._log_span = np.log1p(self._span)
        # The declared day-to-day and between-people sds on the [0, 1] scale (a log channel's
        # fraction r moves log1p(value - min) by about r); the defaults where none is declared.
        self.day_sd = self._unit_scale([c.day_sd for c in spec.channels], DEFAULT_DAY_SD)
        self.week_sd = self._unit_scale([c.week_sd for c in spec.channels], DEFAULT_WEEK_SD)

    def _unit_scale(self, declared: list[float | None], default: float) -> np.ndarray:
        return np.array(
            [
                default if d is None else d / (ls if log else span)
                for d, log, ls, span in zip(declared, self._log, self._log_span, self._span, strict=True)
            ]
        )

    @classmethod
    def from_schema(cls, schema: CohortSchema) -> SequenceEncoder:
        if schema.sequence is None:
            raise EncoderError("the cohort schema declares no [sequence] table")
        return cls(schema.sequence, id_column=schema.id_column)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def columns(self) -> list[str]:
        return [self.id_column, self.day_column, *self.channels]

    def transform(self, frame: pd.DataFrame, ids: Sequence[Any] | None = None) -> np.ndarray:
        """Rows -> (len(ids), length, channels), patients in the order of `ids` (default: first seen).

        Pass the static table's ids so row i of the result lines up with its condition vector.
        Values are clipped to the declared range: that bound is what DP sensitivities assume.
        """
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise EncoderError(f"timeseries frame lacks columns {missing}")
        order = pd.Index(pd.unique(frame[self.id_column]) if ids is None else list(ids))
        if order.has_duplicates:
            raise EncoderError("patient ids repeat in the requested order")
        patient = order.get_indexer(frame[self.id_column])
        day = frame[self.day_column].to_numpy(dtype=np.int64) - 1
        if (patient < 0).any():
            raise EncoderError("timeseries has patients outside the requested ids")
        if ((day < 0) | (day >= self.length)).any():
            raise EncoderError(f"days must lie in 1..{self.length}")
        cells = patient * self.length + day
        if len(frame) != len(order) * self.length or len(np.unique(cells)) != len(frame):
            raise EncoderError(f"every patient needs exactly one row for each of the {self.length} days")
        values = frame[self.channels].to_numpy(dtype=np.float64)
        out = np.empty((len(order), self.length, self.n_channels), dtype=np.float64)
        out[patient, day] = self.to_unit(values)
        return out.astype(np.float32)

    def to_unit(self, values: np.ndarray) -> np.ndarray:
        """Raw values (..., channels) -> [0, 1], clipped to the declared range first."""
        shifted = np.clip(values - self._low, 0.0, self._span)
        return np.where(self._log, np.log1p(shifted) / self._log_span, shifted / self._span)

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        """[0, 1] (..., channels) -> raw values inside the declared ranges (inverse of `to_unit`)."""
        unit = np.clip(unit, 0.0, 1.0)
        shifted = np.where(self._log, np.expm1(unit * self._log_span), unit * self._span)
        return np.clip(shifted, 0.0, self._span) + self._low

    def inverse_transform(self, array: np.ndarray, ids: Sequence[Any] | None = None) -> pd.DataFrame:
        """(patients, length, channels) in [0, 1] -> long-format rows inside the declared ranges."""
        n = array.shape[0]
        if array.shape[1:] != (self.length, self.n_channels):
            raise EncoderError(f"array shape {array.shape[1:]} != ({self.length}, {self.n_channels})")
        ids = list(ids) if ids is not None else [f"S{i:06d}" for i in range(1, n + 1)]
        if len(ids) != n:
            raise EncoderError(f"{len(ids)} ids for {n} sequences")
        scaled = self.from_unit(array.astype(np.float64))
        data: dict[str, Any] = {
            self.id_column: np.repeat(np.asarray(ids, dtype=object), self.length),
            self.day_column: np.tile(np.arange(1, self.length + 1, dtype=np.int64), n),
        }
        for j, name in enumerate(self.channels):
            data[name] = scaled[:, :, j].reshape(-1)
        return pd.DataFrame(data, columns=self.columns)
