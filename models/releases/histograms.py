"""DP histograms of every static column on the schema's public cells: the encoder's basis."""

from __future__ import annotations

from typing import Any

import numpy as np

from configs.schema import CohortSchema
from models.releases.base import Members, finite_array
from models.statistics import Histograms, histogram_counts, merge_histograms
from privacy.facade import release_noisy_histograms
from privacy.ledger import PrivacyLedger

HISTOGRAMS = "histograms"


class HistogramRelease:
    """One Gaussian release of all columns' counts; one patient moves one cell per column by 1,
    so the L2 sensitivity is sqrt(columns) (see `release_noisy_histograms`)."""

    name = HISTOGRAMS

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
        counts = histogram_counts(members.static, schema)
        return release_noisy_histograms(counts, ledger=ledger, rng=rng, noise_multiplier=noise_multiplier)

    def to_arrays(self, value: Histograms) -> dict[str, np.ndarray]:
        return dict(value)

    def from_arrays(self, arrays: dict[str, np.ndarray], schema: CohortSchema) -> Histograms:
        return {
            spec.name: finite_array(arrays, spec.name, (spec.n_cells(),), f"histogram of '{spec.name}'")
            for spec in schema.columns
        }

    def merge(self, parts: list[Histograms]) -> Histograms:
        return merge_histograms(parts)
