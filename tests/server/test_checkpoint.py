"""Tests for server.checkpoint: round trip, atomic replacement, refusals that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

import server.checkpoint as checkpoint_module
from configs.settings import load_settings
from server.checkpoint import (
    CheckpointError,
    RunProgress,
    flat_settings,
    ledger_summaries,
    load_checkpoint,
    save_checkpoint,
    settings_changes,
)
from server.export import HospitalSummary
from strategies.rounds import RoundLog


def _progress(rounds_done: int) -> RunProgress:
    logs = [
        RoundLog(r, accepted=[{"hospital": "hospital-1", "node": 5, "epsilon": 0.5 * r}], stage="dp-ctgan")
        for r in range(1, rounds_done + 1)
    ]
    hospitals = {"hospital-1": HospitalSummary("hospital-1", 100, 0.2, 1e-5, 5.0)}
    return RunProgress(
        federation_id="abc123",
        settings=flat_settings(load_settings()),
        encoder_json="{}",
        stage_index=0,
        stage_label="dp-ctgan",
        rounds_done=rounds_done,
        total_rounds_done=rounds_done,
        hospitals={name: vars(h) for name, h in hospitals.items()},
        refusals=[],
        releases=["histograms"],
        controller=None,
        round_logs=[vars(log) for log in logs],
        stage_scores={"dp-ctgan": {str(r): 0.8 for r in range(1, rounds_done + 1)}},
        ledger_summaries=ledger_summaries(hospitals, logs),
        written_at="2026-11-21T00:00:00+00:00",
    )


def _weights(scale: float) -> dict[str, ArrayRecord]:
    # key order deliberately not sorted: models load their state dicts in their own order
    arrays = {
        "z.weight": np.full((2, 3), scale, np.float32),
        "a.bias": np.arange(3, dtype=np.int64),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),  # 0-d, as BatchNorm keeps it
    }
    return {"dp-ctgan": ArrayRecord({k: Array(v) for k, v in arrays.items()})}


def _statistics() -> dict[str, dict[str, np.ndarray]]:
    return {"histograms": {"age": np.array([1.0, 2.0]), "gender": np.array([3.0])}}


def test_round_trip_keeps_weights_order_dtypes_and_progress(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _progress(2), weights=_weights(1.5), statistics=_statistics())
    loaded = load_checkpoint(tmp_path)
    assert loaded.progress.rounds_done == 2
    assert [log.server_round for log in loaded.progress.logs()] == [1, 2]
    assert loaded.progress.scores() == {"dp-ctgan": {1: 0.8, 2: 0.8}}
    assert loaded.progress.ledger_summaries == {"hospital-1": 1.0}  # the latest round's epsilon
    weights = loaded.weights("dp-ctgan")
    assert list(weights.keys()) == ["z.weight", "a.bias", "bn.num_batches_tracked"]
    assert weights["bn.num_batches_tracked"].numpy().shape == ()  # 0-d stays 0-d
    np.testing.assert_array_equal(weights["z.weight"].numpy(), np.full((2, 3), 1.5, np.float32))
    assert weights["a.bias"].numpy().dtype == np.int64
    assert list(loaded.statistics("histograms")) == ["age", "gender"]
    assert loaded.progress.hospital_summaries()["hospital-1"].num_examples == 100


def test_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint(tmp_path, _progress(1), weights=_weights(1.0), statistics=_statistics())
    real_save = checkpoint_module.save_file
    calls = []

    def dies_on_second_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")  # what a kill looks like from inside the write
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _progress(2), weights=_weights(2.0), statistics=_statistics())
    loaded = load_checkpoint(tmp_path)
    assert loaded.progress.rounds_done == 1
    np.testing.assert_array_equal(loaded.weights("dp-ctgan")["z.weight"].numpy(), np.ones((2, 3)))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no staging folder left behind


def test_missing_checkpoint_says_to_start_without_resume(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*start the run without resume"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda text: text[: len(text) // 2],  # truncated JSON
        lambda text: json.dumps({**json.loads(text), "rounds_done": "two"}),  # wrong type
        lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "federation_id"}),
    ],
)
def test_malformed_checkpoint_is_refused_with_its_path(tmp_path: Path, corrupt) -> None:
    save_checkpoint(tmp_path, _progress(1), weights=_weights(1.0), statistics=_statistics())
    state = tmp_path / "checkpoint" / "checkpoint.json"
    state.write_text(corrupt(state.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is malformed"):
        load_checkpoint(tmp_path)


def test_non_utf8_checkpoint_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _progress(1), weights=_weights(1.0), statistics=_statistics())
    (tmp_path / "checkpoint" / "checkpoint.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(tmp_path)


def test_unreadable_weights_file_names_the_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _progress(1), weights=_weights(1.0), statistics=_statistics())
    (tmp_path / "checkpoint" / "dp-ctgan.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"dp-ctgan\.safetensors is unreadable"):
        load_checkpoint(tmp_path).weights("dp-ctgan")


def test_settings_changes_list_what_differs_but_not_operational_knobs() -> None:
    saved = flat_settings(load_settings())
    same_but_slower = load_settings(None, {"federation.round_timeout_s": 30.0, "runtime.device": "cpu"})
    assert settings_changes(saved, same_but_slower) == []
    other = load_settings(None, {"stages.timegan.phases.joint": 7, "privacy.max_epsilon": 3.0})
    changes = settings_changes(saved, other)
    assert any(c.startswith("stages:") and "'joint': 7" in c for c in changes), changes
    assert any(c.startswith("privacy.max_epsilon:") for c in changes), changes
    assert len(changes) == 2


def test_settings_compare_the_schema_by_content_not_path(tmp_path: Path) -> None:
    import shutil

    settings = load_settings()
    saved = flat_settings(settings)
    copy = tmp_path / "elsewhere" / "cohort.toml"
    copy.parent.mkdir()
    shutil.copy(settings.schema_path, copy)
    moved = load_settings(None, {"schema": str(copy)})
    assert moved.schema_path != settings.schema_path
    assert settings_changes(saved, moved) == []
    text = copy.read_text(encoding="utf-8")
    assert "max = 90" in text
    copy.write_text(text.replace("max = 90", "max = 95"), encoding="utf-8")
    assert [c.split(":")[0] for c in settings_changes(saved, load_settings(None, {"schema": str(copy)}))] == [
        "schema"
    ]


def test_a_checkpoint_of_another_version_is_refused_with_both_numbers(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _progress(1), weights=_weights(1.0), statistics=_statistics())
    state = tmp_path / "checkpoint" / "checkpoint.json"
    state.write_text(
        json.dumps({**json.loads(state.read_text(encoding="utf-8")), "version": 1}), encoding="utf-8"
    )
    with pytest.raises(
        CheckpointError, match=rf"has version 1, expected {checkpoint_module.CHECKPOINT_VERSION}"
    ):
        load_checkpoint(tmp_path)


def test_statistics_the_checkpoint_does_not_hold_are_named(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _progress(1), weights=_weights(1.0), statistics=_statistics())
    with pytest.raises(CheckpointError, match="no 'numeric-moments' statistics"):
        load_checkpoint(tmp_path).statistics("numeric-moments")
