"""Shared tabular encoder built from the schema and merged DP histograms, never from rows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from configs.schema import CohortSchema, ColumnSpec
from models.statistics import Histograms

ENCODER_VERSION = 1
# Quantiles are kept inside (eps, 1-eps) so the probit transform stays finite; eps sits below
# the smallest floored bin mass (_BIN_FLOOR_SHARE / 200 cells), so clipping never crosses a bin.
_U_EPS = 1e-6
# Each bin gets at least this share of the column's mass, so the piecewise-linear CDF is
# strictly increasing and invertible even where the DP histogram has empty bins.
_BIN_FLOOR_SHARE = 1e-3


@dataclass(frozen=True)
class Block:
    """One column's slice of the encoded vector."""

    name: str
    kind: str  # "numeric" | "categorical"
    start: int
    width: int


class EncoderError(ValueError):
    """An encoder spec or an input frame does not fit the schema."""


class TabularEncoder:
    """Numeric columns: DP-quantile (piecewise-linear CDF) then probit; categorical: one-hot.

    The numeric transform is a quantile transformer whose CDF comes from the merged DP
    histograms, so a generator that outputs standard normals already matches each marginal,
    and the encoder itself reveals nothing beyond those DP histograms.
    """

    def __init__(self, schema: CohortSchema, columns: list[dict[str, Any]]):
        self.schema = schema
        self._columns = columns
        self.blocks: list[Block] = []
        start = 0
        for entry in columns:
            width = len(entry["categories"]) if entry["kind"] == "categorical" else 1
            kind = "categorical" if entry["kind"] == "categorical" else "numeric"
            self.blocks.append(Block(entry["name"], kind, start, width))
            start += width
        self.width = start

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_histograms(cls, schema: CohortSchema, histograms: Histograms) -> TabularEncoder:
        columns = [_column_entry(spec, histograms.get(spec.name)) for spec in schema.columns]
        return cls(schema, columns)

    def to_spec(self) -> dict[str, Any]:
        return {
            "version": ENCODER_VERSION,
            "schema_hash": self.schema.schema_hash(),
            "columns": self._columns,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_spec(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Version hash clients compare before they train on the server's encoder."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str, schema: CohortSchema) -> TabularEncoder:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise EncoderError(f"encoder spec is not valid JSON: {err}") from None
        if spec.get("version") != ENCODER_VERSION:
            raise EncoderError(f"encoder version {spec.get('version')} != {ENCODER_VERSION}")
        if spec.get("schema_hash") != schema.schema_hash():
            raise EncoderError("encoder was built for another cohort schema (schema hash differs)")
        names = [entry.get("name") for entry in spec["columns"]]
        if names != schema.column_names:
            raise EncoderError(f"encoder columns {names} != schema columns {schema.column_names}")
        return cls(schema, spec["columns"])

    # ---------------------------------------------------------------- views
    def categorical_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "categorical"]

    def marginal(self, name: str) -> np.ndarray:
        """DP marginal probabilities of a categorical column (public after the handshake)."""
        entry = self._entry(name)
        return np.asarray(entry["probabilities"], dtype=np.float64)

    def _entry(self, name: str) -> dict[str, Any]:
        return next(entry for entry in self._columns if entry["name"] == name)

    # ---------------------------------------------------------------- transforms
    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows -> float32 matrix of width `self.width`."""
        missing = [b.name for b in self.blocks if b.name not in frame.columns]
        if missing:
            raise EncoderError(f"frame lacks columns {missing}")
        out = np.zeros((len(frame), self.width), dtype=np.float32)
        for block, entry in zip(self.blocks, self._columns, strict=True):
            values = frame[block.name]
            if block.kind == "categorical":
                codes = pd.Categorical(values, categories=entry["categories"]).codes
                if (codes < 0).any():
                    raise EncoderError(f"column '{block.name}' has values outside its categories")
                out[np.arange(len(frame)), block.start + codes] = 1.0
            else:
                x = values.to_numpy(dtype=np.float64)
                u = np.interp(x, entry["edges"], entry["cdf"])
                out[:, block.start] = ndtri(np.clip(u, _U_EPS, 1 - _U_EPS))
        return out

    def inverse_transform(self, matrix: np.ndarray) -> pd.DataFrame:
        """Encoded matrix -> rows in the schema's types, inside the declared ranges."""
        data: dict[str, Any] = {}
        for block, entry in zip(self.blocks, self._columns, strict=True):
            part = matrix[:, block.start : block.start + block.width]
            if block.kind == "categorical":
                data[block.name] = np.asarray(entry["categories"])[part.argmax(axis=1)]
            else:
                u = ndtr(part[:, 0].astype(np.float64))
                x = np.interp(u, entry["cdf"], entry["edges"])
                spec = self.schema.column(block.name)
                x = np.clip(x, spec.min, spec.max)
                data[block.name] = np.rint(x).astype(np.int64) if spec.kind == "integer" else x
        return pd.DataFrame(data, columns=self.schema.column_names)


def _column_entry(spec: ColumnSpec, counts: np.ndarray | None) -> dict[str, Any]:
    n_cells = spec.n_cells()
    if counts is None:
        counts = np.ones(n_cells)
    counts = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    if counts.shape != (n_cells,):
        raise EncoderError(f"histogram of '{spec.name}' has {counts.shape} cells, need {n_cells}")
    total = counts.sum()
    if total <= 0:
        counts, total = np.ones(n_cells), float(n_cells)
    floored = np.maximum(counts, _BIN_FLOOR_SHARE * total / n_cells)
    probabilities = floored / floored.sum()
    if spec.is_categorical:
        return {
            "name": spec.name,
            "kind": "categorical",
            "categories": list(spec.categories or ()),
            "probabilities": probabilities.tolist(),
        }
    cdf = np.concatenate([[0.0], np.cumsum(probabilities)])
    cdf[-1] = 1.0
    return {
        "name": spec.name,
        "kind": spec.kind,
        "edges": spec.bin_edges().tolist(),
        "cdf": cdf.tolist(),
    }
