"""Coarse cells and within-bin positions of static rows, and back to values in the schema's types."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from configs.schema import CohortSchema, ColumnSpec
from models.encoder import EncoderError, TabularEncoder
from models.pgm.domain import to_cells

# Positions stay inside (eps, 1 - eps): a value on a bin's upper edge would belong to the next bin.
_U_EPS = 1e-6
# Decoded real values this close to a bin edge (a share of the column's range) are put on it: the
# encoder's float32 probits move a value by up to ~1e-6 of the range, which carried values recorded
# on an edge (bmi 23.0) into the bin below (2% of the demo cohort's bmi cells).
_EDGE_SNAP = 1e-5


@dataclass(frozen=True)
class NumericBins:
    """One numeric column's public bins; for integers, the allowed values each bin holds."""

    name: str
    column: int  # position among the schema's columns (and the cells' columns)
    edges: np.ndarray
    integer: bool
    first: np.ndarray  # integers: each bin's smallest allowed value
    count: np.ndarray  # integers: how many allowed values each bin holds
    step: int

    @property
    def has_fine(self) -> bool:
        """Whether some bin holds more than one value (so a row's cell leaves its value open)."""
        return not self.integer or bool((self.count > 1).any())


def _numeric_bins(spec: ColumnSpec, column: int) -> NumericBins:
    """The public bins of a numeric column (same integer rule as `models.pgm.domain`)."""
    edges = spec.bin_edges()
    step = spec.step or 1
    if spec.kind != "integer":
        empty = np.zeros(len(edges) - 1, np.int64)
        return NumericBins(spec.name, column, edges, False, empty, empty, step)
    assert spec.min is not None and spec.max is not None
    low, high = edges[:-1], edges[1:]
    first = np.maximum(np.ceil((low - spec.min) / step), 0)
    last = np.floor((high - spec.min) / step)
    last = np.where(spec.min + last * step == high, last - 1, last)
    last = np.minimum(last, (spec.max - spec.min) // step)
    count = np.maximum(last - first + 1, 1).astype(np.int64)
    return NumericBins(
        spec.name, column, edges, True, (spec.min + first * step).astype(np.int64), count, step
    )


def to_probit(u: np.ndarray) -> np.ndarray:
    """Positions in (0, 1) -> standard-normal scores (the space the networks model)."""
    return ndtri(np.clip(u, _U_EPS, 1 - _U_EPS))


def from_probit(z: np.ndarray) -> np.ndarray:
    """Standard-normal scores -> positions in (0, 1)."""
    return np.clip(ndtr(np.asarray(z, dtype=np.float64)), _U_EPS, 1 - _U_EPS)


class FineLayout:
    """Which columns have a fine part, and the condition vector (one-hot of every column's cell)."""

    def __init__(self, schema: CohortSchema):
        self.schema = schema
        self.numeric = [
            _numeric_bins(spec, j) for j, spec in enumerate(schema.columns) if not spec.is_categorical
        ]
        self.fine = [bins for bins in self.numeric if bins.has_fine]
        self.cell_counts = [spec.n_cells() for spec in schema.columns]
        self.offsets = np.concatenate([[0], np.cumsum(self.cell_counts)[:-1]]).astype(np.int64)
        self.cond_dim = int(sum(self.cell_counts))

    @property
    def fine_dim(self) -> int:
        return len(self.fine)

    def condition(self, cells: np.ndarray) -> np.ndarray:
        """(rows, cond_dim) float32 one-hot of each column's cell."""
        cond = np.zeros((len(cells), self.cond_dim), dtype=np.float32)
        rows = np.arange(len(cells))
        for j, offset in enumerate(self.offsets):
            cond[rows, offset + cells[:, j]] = 1.0
        return cond

    def positions(
        self, frame: pd.DataFrame, cells: np.ndarray, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """(rows, fine_dim) within-bin positions in (0, 1).

        Continuous: (x - low) / (high - low). Integers: the value's index k among its bin's m
        values, centred ((k + 0.5) / m), or spread over its slot ((k + U) / m, U uniform) when
        `rng` is given, so a network sees a density rather than m spikes.
        """
        out = np.empty((len(frame), self.fine_dim), dtype=np.float64)
        for i, bins in enumerate(self.fine):
            cell = cells[:, bins.column]
            x = np.clip(frame[bins.name].to_numpy(dtype=np.float64), bins.edges[0], bins.edges[-1])
            if bins.integer:
                m = bins.count[cell]
                k = np.clip(np.rint((x - bins.first[cell]) / bins.step), 0, m - 1)
                jitter = 0.5 if rng is None else rng.random(len(x))
                out[:, i] = (k + jitter) / m
            else:
                low, high = bins.edges[cell], bins.edges[cell + 1]
                out[:, i] = (x - low) / (high - low)
        return np.clip(out, _U_EPS, 1 - _U_EPS)

    def values(self, cells: np.ndarray, positions: np.ndarray) -> pd.DataFrame:
        """Rows in the schema's types: categories from the cells, numbers at their position in
        their cell's bin (integers on the bin's allowed values), so every row keeps its cells."""
        fine_index = {bins.name: i for i, bins in enumerate(self.fine)}
        numeric = {bins.name: bins for bins in self.numeric}
        data: dict[str, np.ndarray] = {}
        for j, spec in enumerate(self.schema.columns):
            cell = cells[:, j]
            if spec.is_categorical:
                data[spec.name] = np.asarray(spec.categories, dtype=object)[cell]
                continue
            bins = numeric[spec.name]
            u = positions[:, fine_index[spec.name]] if spec.name in fine_index else np.full(len(cell), 0.5)
            u = np.clip(u, _U_EPS, 1 - _U_EPS)
            if bins.integer:
                k = np.clip(np.floor(u * bins.count[cell]), 0, bins.count[cell] - 1)
                values = bins.first[cell] + k.astype(np.int64) * bins.step
                data[spec.name] = np.clip(values, spec.min, spec.max).astype(np.int64)
            else:
                low, high = bins.edges[cell], bins.edges[cell + 1]
                data[spec.name] = np.clip(low + u * (high - low), spec.min, spec.max).astype(np.float64)
        return pd.DataFrame(data, columns=self.schema.column_names)

    def cells_and_positions(
        self, frame: pd.DataFrame, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's public cells and within-bin positions (see `positions`)."""
        cells = to_cells(frame, self.schema)
        return cells, self.positions(frame, cells, rng)


def decoded_rows(encoder: TabularEncoder, encoded: np.ndarray) -> pd.DataFrame:
    """Encoded profiles back to rows, continuous values within `_EDGE_SNAP` of a bin edge put on it
    (so a real row's cells are those its recorded values have)."""
    frame = encoder.inverse_transform(np.asarray(encoded, dtype=np.float32))
    for spec in encoder.schema.columns:
        if spec.kind != "continuous":
            continue
        assert spec.min is not None and spec.max is not None
        edges = spec.bin_edges()
        x = frame[spec.name].to_numpy(dtype=np.float64)
        at = np.searchsorted(edges, x)
        below, above = edges[np.clip(at - 1, 0, len(edges) - 1)], edges[np.clip(at, 0, len(edges) - 1)]
        nearest = np.where(np.abs(x - below) < np.abs(x - above), below, above)
        tolerance = _EDGE_SNAP * (spec.max - spec.min)
        frame[spec.name] = np.where(np.abs(x - nearest) < tolerance, nearest, x)
    return frame


def _label_probabilities(marginal: np.ndarray, categories: list[str], shares: dict[str, float]) -> np.ndarray:
    """The label's classes at `shares`, the rest spread as in `marginal` (PrivatePGM's rule)."""
    unknown = sorted(set(shares) - set(categories))
    if unknown or any(not 0 < s < 1 for s in shares.values()) or sum(shares.values()) >= 1 + 1e-9:
        raise EncoderError(
            f"label shares {shares} must be classes of the label {categories}, "
            "each in (0, 1), summing to at most 1"
        )
    rest = [i for i, c in enumerate(categories) if c not in shares]
    target = np.array([shares.get(c, 0.0) for c in categories])
    if rest:
        target[rest] = (1.0 - sum(shares.values())) * marginal[rest] / max(marginal[rest].sum(), 1e-12)
    return target / target.sum()


def independent_cells(
    encoder: TabularEncoder,
    n: int,
    rng: np.random.Generator,
    label_shares: dict[str, float] | None = None,
) -> np.ndarray:
    """(n, columns) cells drawn column by column from the encoder's DP one-way marginals.

    A weak stand-in for a coarse model (no column goes with another), but public: the marginals
    are the handshake's DP histograms, so these cells carry no record.
    """
    schema = encoder.schema
    entries = {entry["name"]: entry for entry in encoder.to_spec()["columns"]}
    cells = np.zeros((n, len(schema.columns)), dtype=np.int64)
    for j, spec in enumerate(schema.columns):
        entry = entries[spec.name]
        if spec.is_categorical:
            p = np.asarray(entry["probabilities"], dtype=np.float64)
            if label_shares and spec.name == schema.label_column:
                p = _label_probabilities(p, list(entry["categories"]), label_shares)
        else:
            p = np.diff(np.asarray(entry["cdf"], dtype=np.float64))  # each public bin's DP mass
        cells[:, j] = rng.choice(len(p), size=n, p=p / p.sum())
    return cells
