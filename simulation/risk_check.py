"""Risk models against real demo patients (simulation only): every route beside the ceiling."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from models.bundle import RISK_BUNDLE, load_bundle
from models.registry import get_model_class
from models.risk.features import encode_patients, label_slice, targets
from models.risk.scores import risk_scores
from simulation.cohort import DemoCohort

CEILING_ROUTE = "ceiling (real cohort, no DP)"
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


def _ceiling(model: Any, params: dict[str, Any], demo: DemoCohort, test: DemoCohort, seed: int) -> dict:
    """The same model trained on the whole real cohort without DP: what federating aims at."""
    started = time.perf_counter()
    ceiling = get_model_class(model.registry_name)(model.encoder, params, seed=seed)
    ceiling.fit_offline(
        encode_patients(model.encoder, demo.static, demo.timeseries), seed=seed, device=torch.device("cpu")
    )
    suffix = "" if params.get("use_week", True) else PROFILE_ONLY
    return _row(ceiling, CEILING_ROUTE + suffix, test, time.perf_counter() - started)


def risk_check(
    demo: DemoCohort, test: DemoCohort, release_dir: Path, metrics: dict[str, Any], seed: int
) -> list[dict[str, Any]]:
    """Each exported risk model scored on fresh demo patients, with the run's epsilon, and for each
    kind of model the ceiling, with and without the week (the week branch's worth)."""
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
    for model, params in ceilings.values():  # no DP: epsilon None
        rows.append({**_ceiling(model, params, demo, test, seed), "epsilon": None})
        if params.get("use_week") and demo.timeseries is not None:
            profile_only = {**params, "use_week": False}
            rows.append({**_ceiling(model, profile_only, demo, test, seed), "epsilon": None})
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
