"""DP count tables on the schema's public cells: every column's histogram, and every pair's table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from configs.schema import CohortSchema
from models.pairs import pair_counts, pair_counts_problem
from models.releases.base import Members, ReleaseError, finite_array
from models.statistics import Histograms, histogram_counts, merge_histograms
from privacy.facade import release_noisy_histograms
from privacy.ledger import PrivacyLedger

HISTOGRAMS = "histograms"
PAIRS = "pairs"


class CountTablesRelease:
    """One Gaussian release of a dict of count tables in which one patient moves one cell of each
    table by 1: the L2 sensitivity is sqrt(tables) (see `release_noisy_histograms`)."""

    def __init__(
        self,
        name: str,
        counts: Callable[[pd.DataFrame, CohortSchema], Histograms],
        checked: Callable[[dict[str, np.ndarray], CohortSchema], Histograms],
    ):
        self.name, self._counts, self._checked = name, counts, checked

    def gaussian_releases(self, schema: CohortSchema) -> int:
        return 1

    def measure(
        self,
        members: Members,
        schema: CohortSchema,
        *,
        ledger: PrivacyLedger,
        noise_multiplier: float,
        rng: np.random.Generator,
        released: dict[str, Any],
    ) -> Histograms:
        counts = self._counts(members.static, schema)
        return release_noisy_histograms(
            counts, ledger=ledger, rng=rng, noise_multiplier=noise_multiplier, what=f"handshake {self.name}"
        )

    def to_arrays(self, value: Histograms) -> dict[str, np.ndarray]:
        return dict(value)

    def from_arrays(self, arrays: dict[str, np.ndarray], schema: CohortSchema) -> Histograms:
        return self._checked(arrays, schema)

    def merge(self, parts: list[Histograms]) -> Histograms:
        """Summed, then negatives clipped (post-processing of DP outputs)."""
        return merge_histograms(parts)


def _checked_histograms(arrays: dict[str, np.ndarray], schema: CohortSchema) -> Histograms:
    return {
        spec.name: finite_array(arrays, spec.name, (spec.n_cells(),), f"histogram of '{spec.name}'")
        for spec in schema.columns
    }


def _checked_pairs(arrays: dict[str, np.ndarray], schema: CohortSchema) -> Histograms:
    problem = pair_counts_problem(arrays, schema)
    if problem is not None:
        raise ReleaseError(problem)
    return {key: np.asarray(value, dtype=np.float64) for key, value in arrays.items()}


# Every column's counts on its public cells: the encoder's basis and SA-DQC's column reference.
HISTOGRAM_RELEASE = CountTablesRelease(HISTOGRAMS, histogram_counts, _checked_histograms)
# Every column pair's table on coarse public cells: SA-DQC's categorical-association reference.
PAIR_RELEASE = CountTablesRelease(PAIRS, pair_counts, _checked_pairs)
