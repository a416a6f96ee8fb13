"""Tests for server.export: the model card, metrics.json rows and the files export_run writes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import server.export as export
from configs.schema import load_schema
from models.statistics import histogram_counts
from simulation.cohort import generate_demo_cohort
from strategies.rounds import RoundLog

SCHEMA = load_schema()
# Only the fields export_run reads: the full settings are validated elsewhere.
SETTINGS = SimpleNamespace(
    privacy=SimpleNamespace(clipping_norm=1.0),
    federation=SimpleNamespace(local_epochs=2, batch_size=64),
    to_toml_dict=lambda: {"federation": {"local_epochs": 2}},
)


def _rounds() -> list[RoundLog]:
    a1 = {"node": 1, "hospital": "a", "epsilon": 0.5, "steps": 10, "g-loss-sum": 3.0, "records-seen": 50}
    b1 = {"node": 2, "hospital": "b", "epsilon": 0.7, "steps": 5, "g-loss-sum": 2.0}
    return [
        RoundLog(1, [a1, b1], "generator", [{"node": 3}], True),
        RoundLog(2, [{"node": 1, "hospital": "a", "epsilon": 0.9}], "generator", [], False),
        RoundLog(1, [{"node": 2, "hospital": "b", "epsilon": 1.2, "steps": 3}], "sequence", [], True),
    ]


@pytest.fixture
def saved_cards(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, dict[str, Any]]]:
    """Stub the bundle writer (it needs a trained model) and record what it was given."""
    cards: list[tuple[Path, dict[str, Any]]] = []

    def fake_save(folder: Path, *, model: Any, card: dict[str, Any]) -> dict[str, Any]:
        cards.append((folder, card))
        return {**card, "encoder_hash": "abc", "files": {"weights": "123"}}

    monkeypatch.setattr(export, "save_bundle", fake_save)
    return cards


def test_export_run_writes_card_tables_and_metrics(tmp_path: Path, saved_cards) -> None:
    synthetic = generate_demo_cohort(100, seed=1).static
    hospitals = {
        1: export.HospitalSummary("a", 100, 0.1, 1e-5, 4.0),
        2: export.HospitalSummary("b", 80, 0.2, 1e-5, 4.0),
    }
    metrics = export.export_run(
        tmp_path,
        model=SimpleNamespace(encoder=SimpleNamespace(schema=SCHEMA), registry_name="ctgan"),
        sequence_model=SimpleNamespace(registry_name="timegan"),
        settings=SETTINGS,
        synthetic=synthetic,
        timeseries=synthetic.head(5),
        handshake_hospitals=hospitals,
        refusals=[],
        rounds=_rounds(),
        stage_scores={"generator": {1: 0.8}},
        reference=histogram_counts(generate_demo_cohort(300, seed=0).static, SCHEMA),
        # the audit's reply carries each hospital's ledger last: its epsilon is the final one
        extra_metrics={"ledger": [{"hospital": "a", "epsilon": 1.05}]},
    )
    (main_dir, card), (seq_dir, seq_card) = saved_cards
    assert main_dir == tmp_path / export.BUNDLE_DIR and seq_dir.name == "sequence"
    assert card["name"] == "mindfed-ctgan" and seq_card["name"] == "mindfed-timegan"
    assert card["privacy"]["ledger"] == [{"hospital": "a", "epsilon": 1.05}]
    assert card["training"]["local_epochs"] == 2
    assert card["training"]["stages"] == {
        "generator": {"rounds": 2, "rounds_aggregated": 1},
        "sequence": {"rounds": 1, "rounds_aggregated": 1},
    }
    # Latest (largest) epsilon each hospital reported, the audit's included, and its rounds.
    assert [(h["hospital"], h["epsilon"], h["rounds_trained"]) for h in metrics["hospitals"]] == [
        ("a", 1.05, 2),
        ("b", 1.2, 2),
    ]
    first = metrics["rounds"][0]
    # a round row names who trained; losses and record counts on real rows stay at the hospitals
    assert first == {
        "stage": "generator",
        "round": 1,
        "aggregated": True,
        "hospitals": ["a", "b"],
        "rejected": [{"node": 3}],
        "score": 0.8,
        # timings: none were measured for these hand-made round logs
        "seconds": 0.0,
        "server_seconds": 0.0,
        "hospital_train_seconds": {},
        "framework_seconds": 0.0,
        "framework_share": None,
    }
    assert metrics["rounds"][1]["score"] is None
    assert metrics["bundle"] == {"path": "bundle", "encoder_hash": "abc", "files": {"weights": "123"}}
    assert metrics["release"] == {"folder": "", "quarantined": False}
    assert json.loads((tmp_path / export.METRICS_FILE).read_text())["final"]["synthetic_rows"] == 100
    assert (tmp_path / export.SYNTHETIC_STATIC).exists() and (tmp_path / export.SYNTHETIC_TIMESERIES).exists()


def test_export_run_without_sequence_model_writes_one_bundle(tmp_path: Path, saved_cards) -> None:
    synthetic = generate_demo_cohort(50, seed=2).static
    metrics = export.export_run(
        tmp_path,
        model=SimpleNamespace(encoder=SimpleNamespace(schema=SCHEMA), registry_name="ctgan"),
        sequence_model=None,
        settings=SETTINGS,
        synthetic=synthetic,
        timeseries=None,
        handshake_hospitals={},
        refusals=[{"hospital": "x", "reason": "schema"}],
        rounds=[],
        stage_scores={},
        reference=histogram_counts(synthetic, SCHEMA),
    )
    assert len(saved_cards) == 1 and saved_cards[0][1]["privacy"]["ledger"] == []
    assert metrics["settings"] == {"federation": {"local_epochs": 2}}
    assert metrics["handshake_refusals"] == [{"hospital": "x", "reason": "schema"}]
    assert not (tmp_path / export.SYNTHETIC_TIMESERIES).exists()
