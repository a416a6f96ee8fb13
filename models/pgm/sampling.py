"""Rows from the fitted graphical model: each column drawn given the columns already drawn that
share a junction-tree clique with it, in a fixed order, from the caller's random generator."""

from __future__ import annotations

import numpy as np

from configs.schema import CohortSchema

# through estimation, which sets JAX up (float64, CPU) before mbi is imported
from models.pgm.estimation import MarkovRandomField, make_junction_tree, marginal_oracles


def _conditional_draw(table: np.ndarray, parents: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One draw per row from P(column | parents' cells): `table` has the parents' axes, then the
    column's. A parent configuration the model gives no mass falls back to the column's marginal."""
    table = np.clip(np.asarray(table, dtype=np.float64), 0.0, None)
    flat = table.reshape(-1, table.shape[-1])
    rows = flat[np.ravel_multi_index(parents, table.shape[:-1])]
    rows[rows.sum(axis=1) <= 0] = flat.sum(axis=0)
    cdf = np.cumsum(rows, axis=1)
    u = rng.random(len(rows)) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=1), table.shape[-1] - 1)


def _marginal_draw(table: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    probabilities = np.clip(np.asarray(table, dtype=np.float64), 0.0, None)
    return rng.choice(probabilities.size, size=n, p=probabilities / probabilities.sum())


def sample_cells(
    model: MarkovRandomField, schema: CohortSchema, n: int, rng: np.random.Generator
) -> np.ndarray:
    """`n` records of cell indices (columns in schema order), drawn i.i.d. from the model.

    mbi's own `synthetic_data` orders each column's parents as a Python set of names, whose order
    changes with every process's hash seed: the same seed drew different rows in different
    processes (and so the hospitals' audit samples differed). Here parents are in schema order.
    """
    jtree, elimination = make_junction_tree(model.domain, [tuple(c) for c in model.cliques])
    cliques = [set(c) for c in jtree.nodes]
    marginals = marginal_oracles.message_passing_stable(
        model.potentials.expand(list(jtree.nodes)), model.total
    )
    position = {name: i for i, name in enumerate(schema.column_names)}
    drawn: dict[str, np.ndarray] = {}
    for column in elimination[::-1]:
        near = set().union(*(c for c in cliques if column in c))
        parents = sorted(near.intersection(drawn), key=position.__getitem__)
        table = np.asarray(marginals.project((*parents, column)).datavector(flatten=False))
        drawn[column] = (
            _conditional_draw(table, [drawn[p] for p in parents], rng)
            if parents
            else _marginal_draw(table, n, rng)
        )
    return np.stack([drawn[name].astype(np.int64) for name in schema.column_names], axis=1)
