"""Noisy marginal tables of chosen column sets (cliques): measured at a hospital, summed at the server."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from configs.schema import CohortSchema, ColumnSpec
from models.pairs import cell_codes
from privacy.ledger import PrivacyLedger

Clique = tuple[str, ...]
CLIQUE_SEPARATOR = "|"


@dataclass(frozen=True)
class Measurement:
    """A summed noisy table of one column set and the standard deviation of its per-cell noise."""

    clique: Clique
    table: np.ndarray
    noise_sd: float
    table_cells: int | None = None  # the table's cell budget (None: `TABLE_CELLS` by its size)


def clique_key(clique: Clique) -> str:
    return CLIQUE_SEPARATOR.join(clique)


def clique_of(key: str) -> Clique:
    return tuple(key.split(CLIQUE_SEPARATOR))


# Most cells a table of this many columns may have: 1-way tables use every public bin; in larger
# ones the numeric axes share coarser bins (unions of public bins), as many as fit, so a table's
# noise does not swamp the counts it spreads over (a 3-way table of 20-bin columns has 8,000
# cells for a few thousand patients) while a numeric column paired with a small categorical one
# keeps its full resolution (a threshold the label depends on stays sharp).
TABLE_CELLS = {2: 100, 3: 75}


def axis_map(spec: ColumnSpec, max_cells: int | None) -> np.ndarray:
    """For each public cell of a column, its cell on an axis of at most `max_cells` cells."""
    if spec.is_categorical or max_cells is None or max_cells >= spec.n_cells():
        return np.arange(spec.n_cells())
    edges = spec.bin_edges()
    return cell_codes(pd.Series((edges[:-1] + edges[1:]) / 2.0), spec, max_cells)


def numeric_axis_cells(clique: Clique, schema: CohortSchema, table_cells: int | None = None) -> int | None:
    """Cells each numeric axis of the clique's table keeps (None: all of its public bins), for a
    table of at most `table_cells` cells (default `TABLE_CELLS` by the clique's size)."""
    if len(clique) == 1:
        return None
    specs = [schema.column(name) for name in clique]
    fixed = math.prod(s.n_cells() for s in specs if s.is_categorical)
    numeric = [s for s in specs if not s.is_categorical]
    if not numeric:
        return None
    budget = table_cells or TABLE_CELLS[len(clique)]
    per_axis = int((budget / fixed) ** (1 / len(numeric)) + 1e-9)
    return max(2, min(per_axis, max(s.n_cells() for s in numeric)))


def clique_maps(clique: Clique, schema: CohortSchema, table_cells: int | None = None) -> list[np.ndarray]:
    """Public cell -> measured cell, per axis of the clique's table."""
    cells = numeric_axis_cells(clique, schema, table_cells)
    return [axis_map(schema.column(name), cells) for name in clique]


def clique_shape(clique: Clique, schema: CohortSchema, table_cells: int | None = None) -> tuple[int, ...]:
    """Cells per axis of a clique's measured table."""
    return tuple(int(m.max()) + 1 for m in clique_maps(clique, schema, table_cells))


def marginal_counts(
    cells: np.ndarray, schema: CohortSchema, cliques: Sequence[Clique], table_cells: int | None = None
) -> dict[str, np.ndarray]:
    """Exact contingency counts of each clique's measured table over rows of public cell indices."""
    position = {name: j for j, name in enumerate(schema.column_names)}
    tables = {}
    for clique in cliques:
        shape = clique_shape(clique, schema, table_cells)
        maps = clique_maps(clique, schema, table_cells)
        axes = tuple(m[cells[:, position[name]]] for m, name in zip(maps, clique, strict=True))
        flat = np.ravel_multi_index(axes, shape)
        tables[clique_key(clique)] = (
            np.bincount(flat, minlength=math.prod(shape)).reshape(shape).astype(float)
        )
    return tables


def release_marginals(
    cells: np.ndarray,
    schema: CohortSchema,
    cliques: Sequence[Clique],
    *,
    ledger: PrivacyLedger,
    noise_multiplier: float,
    rng: np.random.Generator,
    what: str,
    table_cells: int | None = None,
) -> dict[str, np.ndarray]:
    """One Gaussian release of every clique's table, charged to the ledger.

    Adding or removing one patient changes exactly one cell of each table by 1, so the L2
    sensitivity of k tables released together is sqrt(k): noise N(0, (z sqrt(k))^2) per cell.
    """
    ledger.check(what, noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
    sigma = noise_multiplier * math.sqrt(len(cliques))
    tables = marginal_counts(cells, schema, cliques, table_cells)
    noisy = {key: table + rng.normal(0.0, sigma, table.shape) for key, table in tables.items()}
    ledger.charge_gaussian(what, noise_multiplier=noise_multiplier)
    return noisy


def marginals_problem(
    tables: dict[str, np.ndarray],
    schema: CohortSchema,
    cliques: Sequence[Clique],
    table_cells: int | None = None,
) -> str | None:
    """What is wrong with a hospital's tables (a missing or extra one, a shape, a non-finite cell)."""
    wanted = {clique_key(c): clique_shape(c, schema, table_cells) for c in cliques}
    extra = sorted(set(tables) - set(wanted))
    if extra:
        return f"unexpected marginal tables {extra[:3]}"
    for key, shape in wanted.items():
        if key not in tables:
            return f"marginal table '{key}' is missing"
        table = np.asarray(tables[key])
        if table.shape != shape or not np.issubdtype(table.dtype, np.number) or not np.isfinite(table).all():
            return f"marginal table '{key}' is malformed (shape {table.shape}, need {shape})"
    return None
