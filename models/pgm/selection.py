"""Which marginals to measure, chosen from noisy sums already released (post-processing only)."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np

from configs.schema import CohortSchema
from models.pgm.marginals import Clique, Measurement

Weights = dict[tuple[str, str], float]


def association(table: np.ndarray, noise_sd: float) -> float:
    """L1 distance between a noisy pair table and the product of its own margins (in counts), less
    what noise alone gives (E|N(0, sd)| per cell): how much the pair departs from independence."""
    t = np.clip(np.asarray(table, dtype=np.float64), 0.0, None)
    total = t.sum()
    if total <= 0:
        return 0.0
    independent = np.outer(t.sum(axis=1), t.sum(axis=0)) / total
    return float(np.abs(t - independent).sum() - noise_sd * np.sqrt(2 / np.pi) * t.size)


def survey_weights(survey: list[Measurement]) -> Weights:
    """Each surveyed pair's `association`."""
    return {
        (m.clique[0], m.clique[1]): association(m.table, m.noise_sd) for m in survey if len(m.clique) == 2
    }


def spanning_tree(weights: Weights, schema: CohortSchema) -> list[Clique]:
    """MST's maximum spanning tree over the columns, edges weighted by association."""
    graph = nx.Graph()
    graph.add_nodes_from(schema.column_names)
    for (a, b), weight in weights.items():
        graph.add_edge(a, b, weight=weight)
    order = {name: i for i, name in enumerate(schema.column_names)}
    edges = nx.maximum_spanning_tree(graph).edges()
    return sorted(
        (tuple(sorted((a, b), key=order.__getitem__)) for a, b in edges),
        key=lambda c: (order[c[0]], order[c[1]]),
    )


def label_cliques(weights: Weights, schema: CohortSchema, neighbours: int) -> list[Clique]:
    """The label with each of its `neighbours` most associated columns, and with every two of them.

    A tree keeps only one path between two columns; a label that depends on several scores
    together (the demo's risk level on all three DASS scales) needs them jointly (3-way tables,
    coarse), and the pairs keep each score's own threshold sharp (a small label axis leaves room
    for every public bin of the score).
    """
    label = schema.label_column
    if neighbours < 1 or label not in schema.column_names:
        return []
    ranked = sorted(
        (name for name in schema.column_names if name != label),
        key=lambda name: -weights.get((label, name), weights.get((name, label), 0.0)),
    )[:neighbours]
    order = {name: i for i, name in enumerate(schema.column_names)}
    groups = [(name,) for name in ranked] + list(itertools.combinations(ranked, 2))
    return [tuple(sorted((label, *group), key=order.__getitem__)) for group in groups]
