"""The graphical model behind `pgm`: `mbi` estimation from noisy tables, potentials, sampling."""

from __future__ import annotations

import dataclasses

import jax

# mbi computes in float64 (its own warning asks for it), and its many small programs make JAX's
# persistent compilation cache counterproductive (mbi warns); both set before mbi is imported.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_enable_compilation_cache", False)
jax.config.update("jax_platforms", "cpu")  # a server-side fit of small tables: no accelerator probing

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from mbi import CliqueVector, Domain, Factor, LinearMeasurement, MarkovRandomField, marginal_oracles  # noqa: E402
from mbi.estimation import MirrorDescent  # noqa: E402
from mbi.junction_tree import hypothetical_model_size, make_junction_tree  # noqa: E402, F401

from configs.schema import CohortSchema  # noqa: E402
from models.encoder import EncoderError  # noqa: E402
from models.pgm.marginals import Clique, Measurement, clique_maps  # noqa: E402


@dataclasses.dataclass(frozen=True)
class CoarseQuery:
    """The measured table of a clique from its marginal on public cells: each axis's cells summed
    into the table's (coarser) cells. Hashable, as mbi keeps queries static under jit."""

    maps: tuple[tuple[int, ...], ...]  # per axis: public cell -> measured cell

    def __call__(self, factor: Factor) -> jax.Array:
        values = factor.values
        for mapping in self.maps:  # each contraction moves the axis last: the order comes back
            onehot = np.zeros((len(mapping), max(mapping) + 1))
            onehot[np.arange(len(mapping)), mapping] = 1.0
            values = jnp.tensordot(values, jnp.asarray(onehot), axes=([0], [0]))
        return values.reshape(-1)

    def op_norm_sq(self) -> float:
        """||A||^2 of the aggregation: the most public cells summed into one measured cell."""
        return float(np.prod([np.bincount(np.asarray(m)).max() for m in self.maps]))


def query_of(m: Measurement, schema: CohortSchema) -> CoarseQuery:
    """The query that maps the model's marginal onto this measurement's (coarser) table."""
    return CoarseQuery(tuple(tuple(int(i) for i in k) for k in clique_maps(m.clique, schema, m.table_cells)))


def domain_of(schema: CohortSchema) -> Domain:
    return Domain(schema.column_names, [spec.n_cells() for spec in schema.columns])


def known_total(measurements: list[Measurement]) -> float:
    """Records in the federation, estimated from the noisy tables (inverse-variance weighted sums)."""
    sums = np.array([m.table.sum() for m in measurements])
    variances = np.array([m.noise_sd**2 * m.table.size for m in measurements]) + 1e-9
    return float(max(1.0, np.sum(sums / variances) / np.sum(1.0 / variances)))


def estimate(schema: CohortSchema, measurements: list[Measurement], *, iterations: int) -> MarkovRandomField:
    """Mirror descent on the Gaussian log-likelihood of every measurement (`mbi`)."""
    domain = domain_of(schema)
    linear = [
        LinearMeasurement(
            jnp.asarray(m.table.ravel()),
            m.clique,
            stddev=max(m.noise_sd, 1e-6),
            query=query_of(m, schema),
        )
        for m in measurements
    ]
    return MirrorDescent().estimate(domain, linear, known_total=known_total(measurements), iters=iterations)


def potentials_of(model: MarkovRandomField) -> tuple[dict[Clique, np.ndarray], float]:
    """The model's log-potentials per clique and its total: all a sampler needs."""
    potentials = model.potentials
    return {tuple(c): np.asarray(potentials[c].values, dtype=np.float64) for c in potentials.cliques}, float(
        model.total
    )


def check_potentials(potentials: dict[Clique, np.ndarray], schema: CohortSchema) -> None:
    """Refuse potentials over unknown columns, of the wrong shape, or not finite."""
    for clique, values in potentials.items():
        if any(name not in schema.column_names for name in clique):
            raise KeyError(f"pgm potential over unknown columns {clique}")
        if values.shape != tuple(schema.column(n).n_cells() for n in clique) or not np.isfinite(values).all():
            raise KeyError(f"pgm potential {clique} has shape {values.shape} or non-finite values")


def model_from(schema: CohortSchema, potentials: dict[Clique, np.ndarray], total: float) -> MarkovRandomField:
    """The model back from its potentials (marginals by message passing)."""
    domain = domain_of(schema)
    cliques = list(potentials)
    vector = CliqueVector(
        domain, cliques, {c: Factor(domain.project(c), jnp.asarray(potentials[c])) for c in cliques}
    )
    return MarkovRandomField(
        potentials=vector, marginals=marginal_oracles.message_passing_stable(vector, total), total=total
    )


def reweighted_label(
    model: MarkovRandomField, schema: CohortSchema, shares: dict[str, float]
) -> MarkovRandomField:
    """The model with the label's classes at `shares` (the rest spread as in the model); every other
    column keeps its relationship with the label (the reweighting is a function of the label alone)."""
    label = schema.label_column
    categories = list(schema.column(label).categories or ())
    unknown = sorted(set(shares) - set(categories))
    if unknown or any(not 0 < s < 1 for s in shares.values()) or sum(shares.values()) >= 1 + 1e-9:
        raise EncoderError(
            f"label shares {shares} must be classes of '{label}' {categories}, "
            "each in (0, 1), summing to at most 1"
        )
    current = np.asarray(model.project((label,)).datavector(), dtype=np.float64)
    current = current / current.sum()
    rest = [i for i, c in enumerate(categories) if c not in shares]
    left = 1.0 - sum(shares.values())
    target = np.array([shares.get(c, 0.0) for c in categories])
    if rest:
        target[rest] = left * current[rest] / max(current[rest].sum(), 1e-12)
    return with_column_weights(
        model, schema, label, np.log(np.maximum(target, 1e-12) / np.maximum(current, 1e-12))
    )


def with_column_weights(
    model: MarkovRandomField, schema: CohortSchema, column: str, log_weights: np.ndarray
) -> MarkovRandomField:
    """The model times a function of one column (added to the log-potential of a clique holding it):
    that column's cells are reweighted, every other column's relationship with it kept."""
    potentials, total = potentials_of(model)
    host = next(c for c in potentials if column in c)
    shape = [1] * len(host)
    shape[host.index(column)] = len(log_weights)
    potentials[host] = potentials[host] + np.reshape(log_weights, shape)
    return model_from(schema, potentials, total)


def worst_explained_pairs(
    model: MarkovRandomField,
    survey: list[Measurement],
    schema: CohortSchema,
    *,
    current: list[Clique],
    count: int,
    max_cells: int,
) -> list[Clique]:
    """AIM's "measure what the model explains worst", judged on released sums only: the surveyed
    pairs whose model table is furthest (L1, less the noise's own share) from the survey's, added
    while the model's junction tree stays under `max_cells`."""
    scores = {}
    for m in survey:
        if any(set(m.clique) <= set(c) for c in current):
            continue
        fitted = query_of(m, schema)(model.project(m.clique))
        gap = np.abs(np.asarray(fitted).reshape(m.table.shape) - m.table).sum()
        scores[m.clique] = float(gap - m.noise_sd * np.sqrt(2 / np.pi) * m.table.size)
    chosen: list[Clique] = []
    max_mb = max_cells * 8 / 2**20  # mbi sizes a junction tree in megabytes of float64 cells
    for clique in sorted(scores, key=lambda c: -scores[c]):
        if len(chosen) == count or scores[clique] <= 0:
            break
        if hypothetical_model_size(domain_of(schema), [*current, *chosen, clique]) <= max_mb:
            chosen.append(clique)
    return chosen
