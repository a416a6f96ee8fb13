"""Split a cohort into hospitals of different sizes: IID, or non-IID by Dirichlet over strata."""

from __future__ import annotations

import numpy as np
import pandas as pd

from configs.settings import RunSettings
from simulation.cohort import DemoCohort, check_against_schema, generate_demo_cohort, require_demo_schema


def hospital_sizes(n_hospitals: int) -> np.ndarray:
    """Relative sizes: a large teaching hospital down to small clinics (1, 1/2, 1/3, ...)."""
    weights = 1.0 / np.arange(1, n_hospitals + 1) ** 0.6
    return weights / weights.sum()


def _strata(static: pd.DataFrame) -> pd.Series:
    """Case mix x demographics of the demo cohort (its own columns): risk level, age band and gender."""
    age_band = pd.cut(static["age"], bins=[0, 30, 50, 65, 200], labels=False)
    return static["risk_level"].astype(str) + "|" + age_band.astype(str) + "|" + static["gender"]


def assign_hospitals(
    static: pd.DataFrame, n_hospitals: int, *, mode: str, alpha: float, seed: int
) -> np.ndarray:
    """Hospital index per patient; every hospital gets at least a handful of patients."""
    rng = np.random.default_rng(seed)
    sizes = hospital_sizes(n_hospitals)
    if mode == "iid":
        return rng.choice(n_hospitals, size=len(static), p=sizes)
    if mode != "non-iid":
        raise ValueError(f"partition must be 'iid' or 'non-iid', not {mode!r}")
    assignment = np.empty(len(static), dtype=np.int64)
    for _, index in static.groupby(_strata(static)).indices.items():
        # Dirichlet centred on the hospital sizes: alpha -> infinity recovers IID.
        shares = rng.dirichlet(alpha * n_hospitals * sizes)
        assignment[index] = rng.choice(n_hospitals, size=len(index), p=shares)
    minimum = max(2, len(static) // (20 * n_hospitals))
    for hospital in range(n_hospitals):  # top up a starved hospital from the largest one
        short = minimum - int((assignment == hospital).sum())
        if short > 0:
            donors = np.flatnonzero(assignment == np.bincount(assignment).argmax())
            assignment[rng.choice(donors, size=short, replace=False)] = hospital
    return assignment


def partition_cohort(
    cohort: DemoCohort, n_hospitals: int, *, mode: str, alpha: float, seed: int
) -> list[DemoCohort]:
    assignment = assign_hospitals(cohort.static, n_hospitals, mode=mode, alpha=alpha, seed=seed)
    parts = []
    for hospital in range(n_hospitals):
        static = cohort.static[assignment == hospital].reset_index(drop=True)
        ids = set(static["patient_id"])
        timeseries = cohort.timeseries[cohort.timeseries["patient_id"].isin(ids)].reset_index(drop=True)
        parts.append(DemoCohort(static=static, timeseries=timeseries))
    return parts


def demo_partitions(settings: RunSettings, n_hospitals: int) -> tuple[DemoCohort, list[DemoCohort]]:
    """The seeded demo cohort of a run's settings, and its split into `n_hospitals` hospitals."""
    fed, schema = settings.federation, settings.load_schema()
    require_demo_schema(schema, settings.schema_path)
    assert schema.sequence is not None  # the demo's layout has its daily rhythms
    cohort = generate_demo_cohort(fed.patients, seed=fed.seed, days=schema.sequence.length)
    check_against_schema(cohort, schema)
    parts = partition_cohort(
        cohort, n_hospitals, mode=fed.partition, alpha=fed.dirichlet_alpha, seed=fed.seed
    )
    return cohort, parts
