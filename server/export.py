"""Export: model bundle with its card, the synthetic table and metrics.json, each atomic."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd

from configs.settings import RunSettings
from configs.wire import TRAIN_SECONDS
from mindfed import __version__
from models.bundle import RISK_BUNDLE, SEQUENCE_BUNDLE, save_bundle
from models.statistics import Histograms, column_shape_vs_reference, mean_score
from privacy.storage import atomic_write_text, atomic_write_with
from strategies.rounds import RoundLog

logger = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"
SYNTHETIC_STATIC = Path("synthetic") / "static.csv"
SYNTHETIC_TIMESERIES = Path("synthetic") / "timeseries.csv"
METRICS_FILE = "metrics.json"
# Where a release whose audit failed is written instead (unless the operator passes release-on-fail)
QUARANTINE_DIR = "quarantine"

FEDERATED_ROUTE, SYNTHETIC_ROUTE = "federated-dp", "synthetic"
# A synthetic-route model's bundle folder: bundle/risk/<model>-on-synthetic/
SYNTHETIC_SUFFIX = "-on-synthetic"


@dataclass
class TrainedRisk:
    """A trained risk model, the route it took, and what its card adds to the run's."""

    model: Any
    route: str
    seconds: float = 0.0
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        name = self.model.registry_name
        return name + SYNTHETIC_SUFFIX if self.route == SYNTHETIC_ROUTE else name


@dataclass
class HospitalSummary:
    """One hospital as the server knows it: its DP weight and its accountant's figures."""

    hospital: str
    num_examples: float  # the FedAvg weight: a DP count from the handshake, capped (not exact)
    epsilon: float
    delta: float
    max_epsilon: float
    rounds_trained: int = 0


def _hospital_table(
    handshake_hospitals: dict[int, HospitalSummary], rounds: list[RoundLog], ledger: list[dict[str, Any]]
) -> list[HospitalSummary]:
    """Latest epsilon each hospital reported (its accountant's figure, the audit's charge
    included: its ledger comes last) and the rounds it trained."""
    table = {node: HospitalSummary(**asdict(h)) for node, h in handshake_hospitals.items()}
    final = {str(row["hospital"]): float(row["epsilon"]) for row in ledger}
    for summary in table.values():
        summary.epsilon = max(summary.epsilon, final.get(summary.hospital, 0.0))
    for log in rounds:
        for entry in log.accepted:
            summary = table.get(entry["node"])
            if summary is not None:
                summary.epsilon = max(summary.epsilon, float(entry["epsilon"]))
                summary.rounds_trained += 1
    return sorted(table.values(), key=lambda h: h.hospital)


def _round_rows(rounds: list[RoundLog], stage_scores: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """One row per round; hospitals' training losses and record counts stay at the hospitals."""
    return [
        {
            "stage": log.stage,
            "round": log.server_round,
            "aggregated": log.aggregated,
            "hospitals": [e["hospital"] for e in log.accepted],
            "rejected": log.rejected,
            "score": stage_scores.get(log.stage, {}).get(log.server_round),
            **round_timing(log),
        }
        for log in rounds
    ]


def round_timing(log: RoundLog) -> dict[str, Any]:
    """A round's wall time, the server's own step, the slowest hospital's local training (as it
    reported it, to 0.1 s) and what is left: Flower's messaging, serialisation and waiting."""
    local = [float(e.get(TRAIN_SECONDS, 0.0)) for e in log.accepted]
    slowest = max(local, default=0.0)
    framework = max(log.seconds - log.server_seconds - slowest, 0.0)
    return {
        "seconds": log.seconds,
        "server_seconds": log.server_seconds,
        "hospital_train_seconds": {
            e["hospital"]: e[TRAIN_SECONDS] for e in log.accepted if TRAIN_SECONDS in e
        },
        "framework_seconds": framework,
        "framework_share": framework / log.seconds if log.seconds > 0 else None,
    }


def stage_timings(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage: rounds, total wall time, and the shares of the server, the slowest hospital and
    the framework (the run summary prints these)."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        stage = out.setdefault(row["stage"], {"rounds": 0, "seconds": 0.0, "server": 0.0, "framework": 0.0})
        stage["rounds"] += 1
        stage["seconds"] += row["seconds"]
        stage["server"] += row["server_seconds"]
        stage["framework"] += row["framework_seconds"]
    for stage in out.values():
        total = stage["seconds"]
        stage["server_share"] = stage.pop("server") / total if total > 0 else 0.0
        stage["framework_share"] = stage.pop("framework") / total if total > 0 else 0.0
        stage["hospitals_share"] = max(1.0 - stage["server_share"] - stage["framework_share"], 0.0)
    return out


def _model_card(
    model: Any,
    settings: RunSettings,
    hospitals: list[dict[str, Any]],
    rounds: list[RoundLog],
    final: dict[str, Any],
    ledger: list[Any],
) -> dict[str, Any]:
    """The model card's own fields; `save_bundle` adds the model, hashes and file digests."""
    return {
        "name": f"mindfed-{model.registry_name}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "mindfed": __version__,
            **{p: version(p) for p in ("flwr", "opacus", "torch", "ctgan")},
        },
        "privacy": {
            "accountant": "Opacus RDP, one accountant per hospital composing all charges",
            "clipping_norm": settings.privacy.clipping_norm,
            "hospitals": [
                {k: h[k] for k in ("hospital", "epsilon", "delta", "max_epsilon", "rounds_trained")}
                for h in hospitals
            ],
            # every charge each hospital's accountant recorded (as the hospital reported it)
            "ledger": ledger,
        },
        "training": {
            "stages": {
                stage: {
                    "rounds": sum(log.stage == stage for log in rounds),
                    "rounds_aggregated": sum(log.aggregated for log in rounds if log.stage == stage),
                }
                for stage in dict.fromkeys(log.stage for log in rounds)
            },
            "local_epochs": settings.federation.local_epochs,
            "batch_size": settings.federation.batch_size,
            "hospitals": len(hospitals),
        },
        "metrics": final,
    }


def _save_bundles(
    out_dir: Path,
    model: Any,
    sequence_model: Any | None,
    risk_models: list[TrainedRisk],
    card: dict[str, Any],
) -> dict[str, Any]:
    """The generator's bundle, the sequence model's and each risk model's nested in it; returns the
    generator's saved card."""
    card = save_bundle(out_dir / BUNDLE_DIR, model=model, card=card)
    nested = [(SEQUENCE_BUNDLE, sequence_model, {})] if sequence_model is not None else []
    nested += [
        (f"{RISK_BUNDLE}/{risk.folder}", risk.model, {**risk.card, "route": risk.route})
        for risk in risk_models
    ]
    for folder, inner, extra in nested:
        save_bundle(
            out_dir / BUNDLE_DIR / folder,
            model=inner,
            card={**card, **extra, "name": f"mindfed-{inner.registry_name}"},
        )
    return card


def export_run(
    out_dir: Path,
    *,
    release_folder: str = "",
    model: Any,
    sequence_model: Any | None,
    risk_models: list[TrainedRisk] | None = None,
    settings: RunSettings,
    synthetic: pd.DataFrame,
    timeseries: pd.DataFrame | None,
    handshake_hospitals: dict[int, HospitalSummary],
    refusals: list[dict[str, Any]],
    rounds: list[RoundLog],
    stage_scores: dict[str, dict[int, float]],
    reference: Histograms,
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write bundle/ and synthetic/ (static.csv, timeseries.csv) under `out_dir/release_folder`
    ("quarantine" after a failed audit), and metrics.json in `out_dir`; return the metrics."""
    out_dir = Path(out_dir)
    release_dir = out_dir / release_folder
    schema = model.encoder.schema
    per_column = column_shape_vs_reference(synthetic, reference, schema)
    ledger = (extra_metrics or {}).get("ledger", [])
    hospitals = [asdict(h) for h in _hospital_table(handshake_hospitals, rounds, ledger)]
    final = {
        "column_shape_vs_dp_reference": mean_score(per_column),
        "column_shape_per_column": per_column,
        "synthetic_rows": len(synthetic),
    }
    card_fields = _model_card(model, settings, hospitals, rounds, final, ledger)
    audit = (extra_metrics or {}).get("audit")
    if audit is not None:  # the verdict and what the audit itself cost each hospital
        card_fields["audit"] = {"passed": audit["passed"], "epsilon": audit.get("epsilon", {})}
    card = _save_bundles(release_dir, model, sequence_model, list(risk_models or []), card_fields)
    atomic_write_with(release_dir / SYNTHETIC_STATIC, lambda tmp: synthetic.to_csv(tmp, index=False))
    if timeseries is not None:
        atomic_write_with(release_dir / SYNTHETIC_TIMESERIES, lambda tmp: timeseries.to_csv(tmp, index=False))
    round_rows = _round_rows(rounds, stage_scores)
    metrics = {
        "final": final,
        "hospitals": hospitals,
        "handshake_refusals": refusals,
        "rounds": round_rows,
        "timings": stage_timings(round_rows),
        "release": {"folder": release_folder, "quarantined": release_folder == QUARANTINE_DIR},
        "risk_models": [
            {"model": r.model.registry_name, "route": r.route, "bundle": r.folder, "seconds": r.seconds}
            for r in risk_models or []
        ],
        "bundle": {
            "path": str(Path(release_folder) / BUNDLE_DIR),
            "encoder_hash": card["encoder_hash"],
            "files": card["files"],
        },
        "settings": settings.to_toml_dict(),
        **(extra_metrics or {}),
    }
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2, default=str))
    logger.info("exported bundle, %d synthetic rows and metrics to %s", len(synthetic), out_dir)
    return metrics
