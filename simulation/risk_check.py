"""Risk models against real demo patients (simulation only): every route beside the ceiling."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from models.bundle import RISK_BUNDLE, load_bundle
from models.registry import get_model_class
from models.risk.features import encode_patients, label_slice, targets
from models.risk.scores import risk_scores
from simulation.cohort import DemoCohort

CEILING_ROUTE = "ceiling (real cohort, no DP)"
ALONE_ROUTE = "one hospital alone, no DP"
CPU = torch.device("cpu")
PROFILE_ONLY = " (profile only)"


def _row(model: Any, route: str, test: DemoCohort, seconds: float | None) -> dict[str, Any]:
    data = encode_patients(model.encoder, test.static, test.timeseries)
    truth = targets(data.profiles, label_slice(model.encoder))
    classes = model.encoder.schema.column(model.encoder.schema.label_column).categories or ()
    return {
        "model": model.registry_name,
        "route": route,
        **risk_scores(model.predict_proba(data), truth, len(classes)),
        "seconds": seconds,
    }


def _trained_without_dp(
    model: Any, params: dict[str, Any], train: DemoCohort, route: str, test: DemoCohort, seed: int
) -> dict[str, Any]:
    """The same kind of model trained on `train` without DP, scored on the test patients."""
    started = time.perf_counter()
    fresh = get_model_class(model.registry_name)(model.encoder, params, seed=seed)
    fresh.fit_offline(encode_patients(model.encoder, train.static, train.timeseries), seed=seed, device=CPU)
    return {**_row(fresh, route, test, time.perf_counter() - started), "epsilon": None}


def _hospital_parts(cohort_dir: Path) -> dict[str, DemoCohort]:
    """Each simulated hospital's own folder, as it would train alone."""
    return {
        folder.name: DemoCohort(pd.read_csv(folder / "static.csv"), pd.read_csv(folder / "timeseries.csv"))
        for folder in sorted(p for p in cohort_dir.iterdir() if (p / "static.csv").is_file())
    }


def risk_check(
    demo: DemoCohort,
    test: DemoCohort,
    release_dir: Path,
    metrics: dict[str, Any],
    seed: int,
    cohort_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Each exported risk model scored on fresh demo patients, with the run's epsilon, and for each
    kind of model the ceiling (the whole real cohort, no DP) with and without the week (the week
    branch's worth), and what each hospital could train alone on its own folder (federating's worth)."""
    folder = release_dir / "bundle" / RISK_BUNDLE
    epsilon = max((h["epsilon"] for h in metrics.get("hospitals", [])), default=float("nan"))
    seconds = {r["bundle"]: r["seconds"] for r in metrics.get("risk_models", [])}
    rows, ceilings = [], {}
    for bundle in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        model, card = load_bundle(bundle)
        rows.append(
            {**_row(model, card.get("route", ""), test, seconds.get(bundle.name)), "epsilon": epsilon}
        )
        if hasattr(model, "fit_offline"):  # a model that can train without DP has a ceiling
            ceilings.setdefault(model.registry_name, (model, card["model_params"]))
    parts = _hospital_parts(cohort_dir) if cohort_dir is not None and cohort_dir.is_dir() else {}
    for model, params in ceilings.values():  # no DP: epsilon None
        rows.append(_trained_without_dp(model, params, demo, CEILING_ROUTE, test, seed))
        if params.get("use_week") and demo.timeseries is not None:
            profile_only = {**params, "use_week": False}
            rows.append(
                _trained_without_dp(model, profile_only, demo, CEILING_ROUTE + PROFILE_ONLY, test, seed)
            )
        for hospital, part in parts.items():
            rows.append(_trained_without_dp(model, params, part, f"{ALONE_ROUTE} ({hospital})", test, seed))
    return rows


TABLE_COLUMNS = ("model", "route", "macro_f1", "high_risk_f1", "auroc", "brier", "epsilon", "seconds")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def risk_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (model x route), as the README quotes it."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
