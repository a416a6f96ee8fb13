"""DP moments of the weekly rhythms (six blocks, `SequenceMoments`): TimeGAN's target."""

from __future__ import annotations

from typing import Any

import numpy as np

from configs.schema import CohortSchema
from models.releases.base import Members, ReleaseError
from models.sequence.encoder import SequenceEncoder
from models.sequence.moments import MOMENT_BLOCKS, SequenceMoments, release_noisy_moments
from privacy.ledger import PrivacyLedger

SEQUENCE_MOMENTS = "sequence-moments"


class SequenceMomentsRelease:
    """Six Gaussian releases, each block with its own sensitivity (`moments_sensitivity`)."""

    name = SEQUENCE_MOMENTS

    def gaussian_releases(self, schema: CohortSchema) -> int:
        return len(MOMENT_BLOCKS)

    def measure(
        self,
        members: Members,
        schema: CohortSchema,
        *,
        ledger: PrivacyLedger,
        noise_multiplier: float,
        rng: np.random.Generator,
        released: dict[str, Any],
    ) -> SequenceMoments:
        if members.weeks is None:
            raise ReleaseError("the schema declares no sequence, but sequence moments were asked for")
        encoder = SequenceEncoder.from_schema(schema)
        return release_noisy_moments(
            members.weeks,
            ledger=ledger,
            noise_multiplier=noise_multiplier,
            rng=rng,
            what="handshake sequence moments",
            day_sd=encoder.day_sd,
            week_sd=encoder.week_sd,
        )

    def to_arrays(self, value: SequenceMoments) -> dict[str, np.ndarray]:
        return {**{name: getattr(value, name) for name in value._FIELDS}, "count": np.asarray(value.count)}

    def from_arrays(self, arrays: dict[str, np.ndarray], schema: CohortSchema) -> SequenceMoments:
        if schema.sequence is None:
            raise ReleaseError("sequence moments were sent, but the schema declares no sequence")
        missing = [name for name in (*SequenceMoments._FIELDS, "count") if name not in arrays]
        if missing:
            raise ReleaseError(f"sequence moments lack {missing}")
        try:
            moments = SequenceMoments(
                count=float(arrays["count"]),
                **{name: np.asarray(arrays[name], dtype=np.float64) for name in SequenceMoments._FIELDS},
            )
        except (TypeError, ValueError) as err:
            raise ReleaseError(f"sequence moments are malformed: {err}") from None
        problem = moments.problem(schema.sequence.length, SequenceEncoder.from_schema(schema).day_sd)
        if problem is not None:
            raise ReleaseError(problem)
        return moments

    def merge(self, parts: list[SequenceMoments]) -> SequenceMoments:
        total = parts[0]
        for part in parts[1:]:
            total = total.merged(part)
        return total
