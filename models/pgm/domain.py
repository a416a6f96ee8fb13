"""Each static column as a finite set of public cells: categories, or the schema's numeric bins."""

from __future__ import annotations

import numpy as np
import pandas as pd

from configs.schema import CohortSchema, ColumnSpec
from models.pairs import cell_codes


def column_cells(values: pd.Series, spec: ColumnSpec) -> np.ndarray:
    """Each value's public cell (the pair tables' rule with every public bin kept: values outside
    the range go to the edge cells); a value with no cell (unknown category, missing) is an error."""
    codes = cell_codes(values, spec, max_bins=spec.n_cells())
    if (codes < 0).any():
        raise ValueError(f"column '{spec.name}' holds a value with no public cell")
    return codes


def to_cells(frame: pd.DataFrame, schema: CohortSchema) -> np.ndarray:
    """(rows, columns) cell indices in schema order."""
    return np.stack([column_cells(frame[spec.name], spec) for spec in schema.columns], axis=1)


def _values_in_bins(cells: np.ndarray, spec: ColumnSpec, rng: np.random.Generator) -> np.ndarray:
    """Values drawn uniformly within each row's bin (for integers: uniformly among its integers)."""
    edges = spec.bin_edges()
    low, high = edges[cells], edges[cells + 1]
    if spec.kind == "integer":
        assert spec.min is not None
        step = spec.step or 1
        # the column's values (min + k * step) inside [low, high); a right edge on one belongs to the next bin
        first = np.ceil((low - spec.min) / step)
        last = np.floor((high - spec.min) / step)
        last = np.where(spec.min + last * step == high, last - 1, last)
        k = first + np.floor(rng.random(len(cells)) * (last - first + 1))
        return (spec.min + k * step).astype(np.int64)
    return low + rng.random(len(cells)) * (high - low)


def from_cells(cells: np.ndarray, schema: CohortSchema, rng: np.random.Generator) -> pd.DataFrame:
    """Rows in the schema's types from cell indices: categories as such, numbers drawn in their bin."""
    data = {}
    for j, spec in enumerate(schema.columns):
        if spec.is_categorical:
            assert spec.categories is not None
            data[spec.name] = np.asarray(spec.categories, dtype=object)[cells[:, j]]
        else:
            values = np.clip(_values_in_bins(cells[:, j], spec, rng), spec.min, spec.max)
            data[spec.name] = values.astype(np.int64) if spec.kind == "integer" else values
    return pd.DataFrame(data, columns=schema.column_names)
