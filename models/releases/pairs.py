"""DP contingency tables of every column pair on coarse public cells (categorical associations)."""

from __future__ import annotations

from typing import Any

import numpy as np

from configs.schema import CohortSchema
from models.pairs import PairCounts, merge_pair_counts, pair_counts, pair_counts_problem
from models.releases.base import Members, ReleaseError
from privacy.facade import release_noisy_histograms
from privacy.ledger import PrivacyLedger

PAIRS = "pairs"


class PairRelease:
    """One Gaussian release of all pair tables; one patient moves one cell per table by 1, so the
    L2 sensitivity is sqrt(pairs) (`models.pairs.pair_sensitivity`)."""

    name = PAIRS

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
    ) -> PairCounts:
        counts = pair_counts(members.static, schema)
        return release_noisy_histograms(counts, ledger=ledger, rng=rng, noise_multiplier=noise_multiplier)

    def to_arrays(self, value: PairCounts) -> dict[str, np.ndarray]:
        return dict(value)

    def from_arrays(self, arrays: dict[str, np.ndarray], schema: CohortSchema) -> PairCounts:
        problem = pair_counts_problem(arrays, schema)
        if problem is not None:
            raise ReleaseError(problem)
        return {key: np.asarray(value, dtype=np.float64) for key, value in arrays.items()}

    def merge(self, parts: list[PairCounts]) -> PairCounts:
        return merge_pair_counts(parts)
