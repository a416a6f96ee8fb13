"""Seeded demo cohort: a synthetic mental-health population with real structure to learn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from configs.errors import ConfigError
from configs.schema import DEFAULT_SCHEMA_PATH, CohortSchema, load_schema
from privacy.storage import atomic_directory

OCCUPATIONS = {
    # name: (share, age range, daily-steps factor, baseline strain)
    "student": (0.15, (18, 29), 1.05, 0.35),
    "healthcare": (0.15, (22, 66), 1.25, 0.30),
    "office": (0.30, (22, 66), 0.80, 0.05),
    "manual": (0.16, (18, 66), 1.45, 0.05),
    "unemployed": (0.10, (18, 66), 0.75, 0.60),
    "retired": (0.14, (60, 90), 0.70, -0.20),
}
GENDERS = (("female", 0.52), ("male", 0.45), ("nonbinary", 0.03))
# (static numeric column, daily channel) links the generator below builds in directly (distress
# moves the rhythms), which benchmarks and tests single out. Other pairs correlate through the
# shared distress too; the metrics of any schema score every pair `link_pairs(schema)` gives.
DEMO_LINK_PAIRS: tuple[tuple[str, str], ...] = (
    ("dass_depression", "sleep_hours"),
    ("dass_depression", "steps"),
    ("dass_anxiety", "resting_hr"),
    ("dass_stress", "hrv_ms"),
    ("dass_stress", "stress_score"),
    ("age", "hrv_ms"),
    ("bmi", "resting_hr"),
)


@dataclass(frozen=True)
class DemoCohort:
    static: pd.DataFrame
    timeseries: pd.DataFrame


def _dass(latent: np.ndarray, rng: np.random.Generator, scale: float, offset: float) -> np.ndarray:
    """DASS-21 subscale: 7 items scored 0-3, summed and doubled, so even values in 0..42."""
    raw = offset + scale * latent + rng.normal(0, 1.5, latent.shape)
    items_sum = np.clip(np.rint(raw / 2.0), 0, 21)
    return (2 * items_sum).astype(np.int64)


# Severity bands of DASS-21 (moderate, severe) per subscale: the questionnaire's part of the label.
DASS_BANDS = {"dass_depression": (14, 21), "dass_anxiety": (10, 15), "dass_stress": (19, 26)}
# How much a strained week (short or irregular sleep, low HRV for one's age, high stress scores)
# moves a patient's risk, in units of one severity band, and the clinician's judgement noise.
WEEK_WEIGHT, JUDGEMENT_SD = 1.0, 0.15


def _week_strain(channels: dict[str, np.ndarray], age: np.ndarray) -> np.ndarray:
    """A patient's week in one number (about 0 for a typical week, 1 for a clearly strained one)."""
    sleep = channels["sleep_hours"]
    short_sleep = np.clip(6.8 - sleep.mean(axis=1), 0, None)
    irregular_sleep = np.clip(sleep.std(axis=1) - 0.8, 0, None)
    expected_log_hrv = np.log(58) - 0.011 * (age - 40)
    low_hrv = np.clip(expected_log_hrv - np.log(channels["hrv_ms"]).mean(axis=1), 0, None) / 0.25
    high_stress = np.clip(channels["stress_score"].mean(axis=1) - 50, 0, None) / 15
    return 0.6 * short_sleep + 0.6 * irregular_sleep + 0.4 * low_hrv + 0.4 * high_stress


def _risk_level(
    static: pd.DataFrame, channels: dict[str, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """Risk from DASS-21 severity bands, moved up by a strained week, with judgement noise: a
    patient's highest band position (0 below moderate, 1 at moderate, 2 at severe, linear between)
    plus the week's strain must reach 1 for moderate and 2 for high."""
    position = np.zeros(len(static))
    for column, (moderate, severe) in DASS_BANDS.items():
        score = static[column].to_numpy(dtype=float)
        subscale = np.where(score < moderate, score / moderate, 1 + (score - moderate) / (severe - moderate))
        position = np.maximum(position, subscale)
    level = (
        position
        + WEEK_WEIGHT * _week_strain(channels, static["age"].to_numpy())
        + rng.normal(0, JUDGEMENT_SD, len(static))
    )
    return np.where(level >= 2, "high", np.where(level >= 1, "moderate", "low"))


def _static_profiles(n: int, rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    names = list(OCCUPATIONS)
    occupation = rng.choice(names, size=n, p=[OCCUPATIONS[o][0] for o in names])
    low = np.array([OCCUPATIONS[o][1][0] for o in occupation])
    high = np.array([OCCUPATIONS[o][1][1] for o in occupation])
    age = np.rint(low + (high - low) * rng.beta(1.6, 2.2, n)).astype(np.int64)
    gender = rng.choice([g for g, _ in GENDERS], size=n, p=[p for _, p in GENDERS])
    p_married = np.clip((age - 20) / 45, 0.02, 0.65)
    p_divorced = np.clip((age - 30) / 120, 0.0, 0.2)
    p_widowed = np.clip((age - 55) / 100, 0.0, 0.3)
    u = rng.random(n)
    marital = np.select(
        [u < p_widowed, u < p_widowed + p_divorced, u < p_widowed + p_divorced + p_married],
        ["widowed", "divorced", "married"],
        "single",
    )
    strain = np.array([OCCUPATIONS[o][3] for o in occupation])
    # Latent distress: occupation strain, youth, being female or nonbinary, loss of a partner.
    distress = (
        rng.normal(0, 1, n)
        + strain
        + 0.012 * (40 - age)
        + np.where(gender == "male", -0.15, 0.1)
        + np.where(gender == "nonbinary", 0.4, 0.0)
        + np.isin(marital, ["divorced", "widowed"]) * 0.3
    )
    dep_latent = distress + rng.normal(0, 0.55, n)
    anx_latent = 0.75 * distress + rng.normal(0, 0.7, n) + np.where(gender == "female", 0.15, 0)
    stress_latent = 0.8 * distress + rng.normal(0, 0.6, n) + 0.25 * strain
    dep = _dass(dep_latent, rng, scale=8.0, offset=9.0)
    anx = _dass(anx_latent, rng, scale=6.5, offset=7.0)
    stress = _dass(stress_latent, rng, scale=7.5, offset=13.0)
    bmi = np.clip(rng.normal(25.5, 4.2, n) + 0.9 * dep_latent + 0.04 * (age - 40), 14.5, 49.5)
    frame = pd.DataFrame(
        {
            "patient_id": [f"P{i:06d}" for i in range(1, n + 1)],
            "age": age,
            "gender": gender,
            "occupation": occupation,
            "marital_status": marital,
            "bmi": np.round(bmi, 1),
            "dass_depression": dep,
            "dass_anxiety": anx,
            "dass_stress": stress,
        }
    )
    latents = {
        "dep": dep_latent,
        "anx": anx_latent,
        "stress": stress_latent,
        "age": age,
        "bmi": bmi,
    }
    latents["steps_factor"] = np.array([OCCUPATIONS[o][2] for o in occupation])
    return frame, latents


def _ar1(n: int, days: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Day-to-day carry-over: unit-variance AR(1) noise per patient."""
    out = np.empty((n, days))
    out[:, 0] = rng.normal(0, 1, n)
    for d in range(1, days):
        out[:, d] = rho * out[:, d - 1] + np.sqrt(1 - rho**2) * rng.normal(0, 1, n)
    return out


def _daily_rhythms(latents: dict[str, np.ndarray], days: int, rng: np.random.Generator) -> dict:
    n = len(latents["age"])
    dep, anx, stress, age, bmi = (latents[k] for k in ("dep", "anx", "stress", "age", "bmi"))
    weekend = np.isin(np.arange(days) % 7, [5, 6]).astype(float)[None, :]
    sleep = 7.3 - 0.55 * dep[:, None] + 0.7 * weekend + 0.8 * _ar1(n, days, 0.5, rng)
    fitness = rng.normal(0, 1, n)
    resting_hr = (
        64
        + 3.2 * anx[:, None]
        + 0.45 * (bmi - 25)[:, None]
        - 3.0 * fitness[:, None]
        + 2.0 * _ar1(n, days, 0.6, rng)
    )
    log_hrv = (
        np.log(58)
        - 0.16 * stress[:, None]
        - 0.011 * (age - 40)[:, None]
        + 0.12 * fitness[:, None]
        + 0.12 * _ar1(n, days, 0.4, rng)
    )
    stress_score = 38 + 11 * stress[:, None] - 6 * weekend + 7 * _ar1(n, days, 0.5, rng)
    log_steps = (
        np.log(7500 * latents["steps_factor"])[:, None]
        - 0.22 * dep[:, None]
        + 0.15 * fitness[:, None]
        - 0.15 * weekend
        + 0.3 * _ar1(n, days, 0.3, rng)
    )
    return {
        "sleep_hours": np.round(np.clip(sleep, 2.0, 13.5), 2),
        "resting_hr": np.round(np.clip(resting_hr, 40, 125), 1),
        "hrv_ms": np.round(np.clip(np.exp(log_hrv), 6, 190), 1),
        "stress_score": np.round(np.clip(stress_score, 0, 100), 1),
        "steps": np.rint(np.clip(np.exp(log_steps), 200, 39000)),
    }


def generate_demo_cohort(n_patients: int, *, seed: int, days: int = 7) -> DemoCohort:
    """The whole demo population: static profiles and their `days` daily wearable values."""
    rng = np.random.default_rng(seed)
    static, latents = _static_profiles(n_patients, rng)
    channels = _daily_rhythms(latents, days, rng)
    static["risk_level"] = _risk_level(static, channels, rng)
    timeseries = pd.DataFrame(
        {
            "patient_id": np.repeat(static["patient_id"].to_numpy(), days),
            "day": np.tile(np.arange(1, days + 1), n_patients),
            **{name: values.reshape(-1) for name, values in channels.items()},
        }
    )
    return DemoCohort(static=static, timeseries=timeseries)


def write_cohort_folder(cohort: DemoCohort, folder: Path) -> None:
    """Data-contract folder (static.csv + timeseries.csv), written whole or not at all."""
    with atomic_directory(folder) as staging:
        cohort.static.to_csv(staging / "static.csv", index=False)
        cohort.timeseries.to_csv(staging / "timeseries.csv", index=False)


def _layout(schema: CohortSchema) -> tuple[object, ...]:
    """The names a cohort folder's files carry under `schema` (ranges and length left aside)."""
    sequence = schema.sequence
    channels = tuple(c.name for c in sequence.channels) if sequence is not None else None
    return (
        schema.id_column,
        schema.label_column,
        tuple(schema.column_names),
        sequence.day_column if sequence is not None else None,
        channels,
    )


def require_demo_schema(schema: CohortSchema, source: str | Path) -> None:
    """Refuse, with the way out, to generate the demo cohort for a schema of other columns."""
    if _layout(schema) != _layout(load_schema(DEFAULT_SCHEMA_PATH)):
        # The generator writes the demo's own columns and daily rhythms; any other schema needs
        # real (or its own synthetic) hospital folders, which every other step reads alike.
        raise ConfigError(
            f"the embedded demo cohort has the columns of {DEFAULT_SCHEMA_PATH.name}, and the schema "
            f"{source} declares others: give your hospitals' folders instead (mindfed simulate "
            "--cohort FOLDER, one data-contract sub-folder per hospital)"
        )


def check_against_schema(cohort: DemoCohort, schema: CohortSchema) -> None:
    """The demo must satisfy the schema it ships with; a drift is a bug, caught early."""
    expected = [schema.id_column, *schema.column_names]
    if list(cohort.static.columns) != expected:
        raise AssertionError(f"demo static columns {list(cohort.static.columns)} != {expected}")
