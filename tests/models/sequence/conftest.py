"""Module-scoped fixtures of the TimeGAN tests: the demo schema and cohort, its encoders, a trained model."""

from __future__ import annotations

import numpy as np
import pytest

from configs.schema import CohortSchema, load_schema
from models.encoder import TabularEncoder
from models.sequence.encoder import SequenceEncoder
from models.sequence.timegan import PHASES, TimeGAN
from models.statistics import histogram_counts
from simulation.cohort import generate_demo_cohort
from tests.models.sequence.support import SMALL, N, _fit


@pytest.fixture(scope="module")
def schema() -> CohortSchema:
    return load_schema()


@pytest.fixture(scope="module")
def cohort(schema: CohortSchema):
    return generate_demo_cohort(N, seed=7)


@pytest.fixture(scope="module")
def encoder(schema: CohortSchema, cohort) -> TabularEncoder:
    return TabularEncoder.from_histograms(schema, histogram_counts(cohort.static, schema))


@pytest.fixture(scope="module")
def weeks(schema: CohortSchema, cohort) -> np.ndarray:
    return SequenceEncoder.from_schema(schema).transform(cohort.timeseries, cohort.static["patient_id"])


@pytest.fixture(scope="module")
def cond(encoder: TabularEncoder, cohort) -> np.ndarray:
    return encoder.transform(cohort.static)


@pytest.fixture(scope="module")
def trained(encoder: TabularEncoder, weeks: np.ndarray, cond: np.ndarray) -> TimeGAN:
    """One non-DP epoch of each phase (module-scoped: tests below must not train it further)."""
    model = TimeGAN(encoder, SMALL, seed=1)
    for phase in PHASES:
        _fit(model, weeks, cond, phase)
    return model
