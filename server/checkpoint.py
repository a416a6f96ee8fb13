"""Server checkpoints after every completed round, written whole or not at all, read back for resume."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from configs.settings import RunSettings
from server.export import HospitalSummary
from strategies.rounds import RoundLog

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
# 3: the handshake's DP statistics stored per release (`models.releases`), the run plan's stages
# (2: numeric moments, six sequence-moment blocks; 1: before them). Older ones cannot be resumed.
CHECKPOINT_VERSION = 3
STATE_FILE = "checkpoint.json"
RELEASE_PREFIX = "release."  # statistics files, apart from the models' weights
# Knobs that may change between a crash and its resume: they steer operations, not results.
OPERATIONAL_SETTINGS = (
    "federation.round_timeout_s",
    "federation.join_timeout_s",
    "federation.min_replies",
    "runtime.",
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or from another run configuration."""


class RunProgress(BaseModel):
    """Where a federated run stands after its last completed round (the JSON part of a checkpoint).

    The handshake's results are kept so a resume never asks hospitals for new DP statistics
    (that would spend epsilon again); the ledger summaries are the epsilon each hospital's
    own accountant last reported, for the operator to read before resuming.
    """

    model_config = ConfigDict(extra="forbid")
    version: int = CHECKPOINT_VERSION
    federation_id: str
    settings: dict[str, Any]
    encoder_json: str
    stage_index: int  # the stage the last completed round belongs to
    stage_label: str
    rounds_done: int  # completed rounds of that stage
    total_rounds_done: int
    hospitals: dict[str, dict[str, Any]]  # hospital name -> its HospitalSummary at the handshake
    refusals: list[dict[str, Any]]
    releases: list[str]  # the handshake's DP releases, each stored as `release.<name>`
    controller: dict[str, Any] | None  # SA-DQC state of the static generator's stage
    round_logs: list[dict[str, Any]]
    stage_scores: dict[str, dict[str, float]]
    ledger_summaries: dict[str, float]  # hospital -> latest epsilon reported by its accountant
    written_at: str

    def logs(self) -> list[RoundLog]:
        return [RoundLog(**log) for log in self.round_logs]

    def scores(self) -> dict[str, dict[int, float]]:
        return {stage: {int(r): s for r, s in rounds.items()} for stage, rounds in self.stage_scores.items()}

    def hospital_summaries(self) -> dict[str, HospitalSummary]:
        return {name: HospitalSummary(**summary) for name, summary in self.hospitals.items()}


def flat_settings(settings: RunSettings) -> dict[str, Any]:
    """Dotted key -> value, the form a resume compares (and an operator reads)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    walk("", json.loads(json.dumps(settings.to_toml_dict(), default=str)))
    # The schema by content, not path: a deployed ServerApp runs from a folder named after the
    # app package's hash, so the same schema sits at another path after a restart.
    flat["schema"] = settings.load_schema().schema_hash()
    return flat


def settings_changes(saved: dict[str, Any], settings: RunSettings) -> list[str]:
    """What differs between the checkpointed run's settings and these, operational knobs aside."""
    current = flat_settings(settings)
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key) and not key.startswith(OPERATIONAL_SETTINGS)
    ]


def resumable_checkpoint(out_dir: Path, settings: RunSettings) -> Checkpoint:
    """The checkpoint a resume goes on from; refused if missing, malformed or made with other settings."""
    checkpoint = load_checkpoint(out_dir)
    changes = settings_changes(checkpoint.progress.settings, settings)
    if changes:
        raise CheckpointError(
            "resume refused, the settings differ from the checkpointed run's: " + "; ".join(changes)
        )
    return checkpoint


def ledger_summaries(hospitals: dict[str, HospitalSummary], logs: list[RoundLog]) -> dict[str, float]:
    """Latest epsilon each hospital's accountant reported: the handshake's, then each round's."""
    latest = {name: summary.epsilon for name, summary in hospitals.items()}
    for log in logs:
        for entry in log.accepted:
            if "epsilon" in entry:
                latest[str(entry["hospital"])] = float(entry["epsilon"])
    return latest


def _arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: np.array(array.numpy(), order="C") for name, array in arrays.items()}


def _numpy_to_arrays(tensors: dict[str, np.ndarray], order: list[str]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.array(tensors[name], order="C")) for name in order})


def save_checkpoint(
    out_dir: Path,
    progress: RunProgress,
    *,
    weights: dict[str, ArrayRecord],
    statistics: dict[str, dict[str, np.ndarray]],
) -> Path:
    """Write `out_dir/checkpoint/` whole: a crash mid-write leaves the previous checkpoint intact.

    `weights`: name -> arrays (e.g. "dp-ctgan", "dp-ctgan.best", "timegan"); `statistics`:
    release name -> its merged DP statistic as arrays (`Release.to_arrays`). Each goes to its own safetensors
    file; the key order is kept in the JSON so arrays come back in the order models expect.
    """
    from privacy.storage import atomic_directory

    folder = Path(out_dir) / CHECKPOINT_DIR
    order = {name: list(arrays.keys()) for name, arrays in weights.items()}
    order |= {RELEASE_PREFIX + name: list(tables) for name, tables in statistics.items()}
    with atomic_directory(folder) as staging:
        for name, arrays in weights.items():
            save_file(_arrays_to_numpy(arrays), str(staging / f"{name}.safetensors"))
        for name, tables in statistics.items():
            save_file(
                {k: np.array(v, order="C") for k, v in tables.items()},
                str(staging / f"{RELEASE_PREFIX}{name}.safetensors"),
            )
        payload = progress.model_dump(mode="json") | {"array_order": order}
        (staging / STATE_FILE).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return folder


class Checkpoint:
    """A checkpoint read back: the progress record plus lazily loaded weights and statistics."""

    def __init__(self, folder: Path, progress: RunProgress, order: dict[str, list[str]]):
        self.folder, self.progress, self._order = folder, progress, order

    def has(self, name: str) -> bool:
        return name in self._order

    def weights(self, name: str) -> ArrayRecord:
        return _numpy_to_arrays(self._load(name), self._order[name])

    def statistics(self, release: str) -> dict[str, np.ndarray]:
        """A DP release's merged statistic as it was saved (arrays, see `Release.from_arrays`)."""
        name = RELEASE_PREFIX + release
        if name not in self._order:
            raise CheckpointError(f"checkpoint has no '{release}' statistics (written by an older MindFed?)")
        tensors = self._load(name)
        return {key: tensors[key] for key in self._order[name]}

    def _load(self, name: str) -> dict[str, np.ndarray]:
        path = self.folder / f"{name}.safetensors"
        try:
            return load_file(str(path))
        except (OSError, ValueError, SafetensorError) as err:
            raise CheckpointError(f"checkpoint file {path} is unreadable: {err}") from err


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """The last checkpoint in `out_dir`, or a CheckpointError that says why there is none."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    state = folder / STATE_FILE
    if not state.is_file():
        raise CheckpointError(f"no checkpoint at {state}: start the run without resume")
    try:
        payload = json.loads(state.read_text(encoding="utf-8"))
        order = payload.pop("array_order")
        progress = RunProgress.model_validate(payload)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, ValidationError) as err:
        raise CheckpointError(f"checkpoint {state} is malformed: {err}") from err
    if progress.version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {state} has version {progress.version}, expected {CHECKPOINT_VERSION}"
        )
    return Checkpoint(folder, progress, order)


def round_log_dicts(logs: list[RoundLog]) -> list[dict[str, Any]]:
    return [asdict(log) for log in logs]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
