"""A seeded sleep-clinic cohort for `other_schema.toml`, written as hospital folders: no demo names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from configs.schema import CohortSchema, load_schema
from simulation.cohort import DemoCohort, write_cohort_folder

OTHER_SCHEMA_PATH = Path(__file__).with_name("other_schema.toml")
SHIFTS = (("daytime", 0.6), ("nights", 0.2), ("rotating", 0.2))
REFERRALS = (("gp", 0.5), ("cardiology", 0.25), ("psychiatry", 0.25))
# Severity bands of the clinical burden below (a score of about 0 to 4): minimal, mild, marked, severe.
SEVERITY_CUTS = (1.2, 2.0, 2.8)


def other_schema(*, with_sequence: bool = True) -> CohortSchema:
    """The sleep clinic's schema, or the same static columns without its nightly sequence."""
    schema = load_schema(OTHER_SCHEMA_PATH)
    return schema if with_sequence else schema.model_copy(update={"sequence": None})


def static_only_schema_file(folder: Path) -> Path:
    """`other_schema.toml` without its [sequence] tables, written into `folder`."""
    text = OTHER_SCHEMA_PATH.read_text(encoding="utf-8")
    path = folder / "other_schema_static.toml"
    path.write_text(text.split("\n[sequence]")[0] + "\n", encoding="utf-8")
    return path


def _ar1(n: int, days: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance AR(1) noise per subject: one night carries over into the next."""
    out = np.empty((n, days))
    out[:, 0] = rng.normal(0, 1, n)
    for d in range(1, days):
        out[:, d] = rho * out[:, d - 1] + np.sqrt(1 - rho**2) * rng.normal(0, 1, n)
    return out


def sleep_clinic_cohort(n: int, *, seed: int, nights: int = 14) -> DemoCohort:
    """Profiles and nights with real links: severity follows the insomnia score and the nights' means."""
    rng = np.random.default_rng(seed)
    shift = rng.choice([s for s, _ in SHIFTS], size=n, p=[p for _, p in SHIFTS])
    referral = rng.choice([r for r, _ in REFERRALS], size=n, p=[p for _, p in REFERRALS])
    distress = rng.normal(0, 1, n) + np.where(referral == "psychiatry", 0.8, 0.0) + (shift != "daytime") * 0.4
    insomnia = np.clip(np.rint(11 + 5 * distress), 0, 28).astype(np.int64)
    ferritin = np.clip(np.exp(rng.normal(np.log(80), 0.6, n)), 5.5, 390.0)
    neck = np.clip(rng.normal(38.5, 3.5, n) + np.where(referral == "cardiology", 2.0, 0.0), 28.5, 54.5)
    efficiency = (
        88.0
        - 0.9 * (insomnia - 11)[:, None]
        - np.where(shift == "rotating", 4.0, 0.0)[:, None]
        + 4.0 * _ar1(n, nights, 0.5, rng)
    )
    log_awakenings = (
        np.log(4.0)
        + 0.35 * np.log(80.0 / ferritin)[:, None]
        + 0.03 * (insomnia - 11)[:, None]
        + 0.3 * _ar1(n, nights, 0.3, rng)
    )
    spo2 = 92.0 - 0.6 * (neck - 38.5)[:, None] + 1.2 * _ar1(n, nights, 0.6, rng)
    channels = {
        "sleep_efficiency": np.round(np.clip(efficiency, 41.0, 99.5), 1),
        "awakenings": np.rint(np.clip(np.exp(log_awakenings), 0.0, 39.0)),
        "spo2_nadir": np.round(np.clip(spo2, 71.0, 99.5), 1),
    }
    burden = (
        insomnia / 9.0
        + (88.0 - channels["sleep_efficiency"].mean(axis=1)) / 8.0
        + np.clip(90.0 - channels["spo2_nadir"].mean(axis=1), 0, None) / 3.0
        + rng.normal(0, 0.2, n)
    )
    severity = np.array(["minimal", "mild", "marked", "severe"])[np.digitize(burden, SEVERITY_CUTS)]
    ids = np.array([f"S{i:05d}" for i in range(1, n + 1)])
    static = pd.DataFrame(
        {
            "subject": ids,
            "insomnia_index": insomnia,
            "ferritin": np.round(ferritin, 1),
            "neck_cm": np.round(neck, 1),
            "shift_pattern": shift,
            "referral": referral,
            "severity": severity,
        }
    )
    timeseries = pd.DataFrame(
        {
            "subject": np.repeat(ids, nights),
            "night": np.tile(np.arange(1, nights + 1), n),
            **{name: values.reshape(-1) for name, values in channels.items()},
        }
    )
    return DemoCohort(static=static, timeseries=timeseries)


def write_hospitals(
    cohort: DemoCohort, cohort_dir: Path, *, hospitals: int = 2, with_sequence: bool = True
) -> list[Path]:
    """One data-contract folder per hospital, of unequal sizes and case mix (referrals cluster)."""
    rng = np.random.default_rng(0)
    # Cardiology referrals lean to the last hospital: the hospitals' case mixes differ.
    lean = np.where(cohort.static["referral"] == "cardiology", hospitals - 1, 0)
    assignment = np.where(rng.random(len(cohort.static)) < 0.3, lean, rng.integers(0, hospitals, len(lean)))
    folders = []
    for hospital in range(hospitals):
        static = cohort.static[assignment == hospital].reset_index(drop=True)
        folder = cohort_dir / f"hospital-{hospital + 1}"
        if with_sequence:
            rows = cohort.timeseries["subject"].isin(set(static["subject"]))
            write_cohort_folder(DemoCohort(static, cohort.timeseries[rows].reset_index(drop=True)), folder)
        else:  # a schema without a sequence: a folder holds static.csv alone
            folder.mkdir(parents=True)
            static.to_csv(folder / "static.csv", index=False)
        folders.append(folder)
    return folders
