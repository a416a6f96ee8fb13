"""DP second moments of the numeric columns: how they go together (`models.numeric_moments`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from configs.schema import CohortSchema
from models.numeric_moments import NUMERIC_KEY, numeric_products_problem, release_numeric_products
from models.releases.base import Members, ReleaseError
from models.releases.counts import HISTOGRAMS
from models.statistics import Histograms
from privacy.ledger import PrivacyLedger

NUMERIC_MOMENTS = "numeric-moments"


class NumericMomentsRelease:
    """One Gaussian release of sum a a^T, a = (standardised numeric columns, 1); its sensitivity is
    `numeric_sensitivity`. Standardises with this hospital's DP histograms, so those come first."""

    name = NUMERIC_MOMENTS

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
    ) -> np.ndarray:
        histograms: Histograms = released[HISTOGRAMS]
        return release_numeric_products(
            members.static, schema, histograms, ledger=ledger, noise_multiplier=noise_multiplier, rng=rng
        )

    def to_arrays(self, value: np.ndarray) -> dict[str, np.ndarray]:
        return {NUMERIC_KEY: value}

    def from_arrays(self, arrays: dict[str, np.ndarray], schema: CohortSchema) -> np.ndarray:
        if NUMERIC_KEY not in arrays:
            raise ReleaseError("numeric moments are missing")
        products = np.asarray(arrays[NUMERIC_KEY]).astype(np.float64)
        problem = numeric_products_problem(products, schema)
        if problem is not None:
            raise ReleaseError(problem)
        return products

    def merge(self, parts: list[np.ndarray]) -> np.ndarray:
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total
