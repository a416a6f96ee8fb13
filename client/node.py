"""A hospital's own settings (node config) and its persisted state: the node is sovereign."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from pydantic import BaseModel, ConfigDict, Field

from configs.settings import RunSettings
from privacy.ledger import PrivacyLedger
from privacy.storage import atomic_write_text

STATE_KEY = "mindfed"


class NodeSettings(BaseModel):
    """What the hospital decides, whatever the server asks (validated once, here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    hospital: str = Field(min_length=1)
    data_dir: Path
    max_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    device: str
    state_dir: Path | None
    # Simulation seeds the DP noise so demo runs repeat; a deployed node draws fresh entropy,
    # because noise anyone can regenerate from a known seed protects nothing.
    reproducible_noise: bool


def node_settings(context: Context, run: RunSettings, federation_id: str = "") -> NodeSettings:
    """Deployment: `data-dir`, `max-epsilon`, ... from the node config. Simulation: partition id.

    The run's privacy figures can only lower the node's: min(node, run) for epsilon and delta.
    A deployed node's state folder is its own (one ledger for its data, across every run). A
    simulated hospital exists for one simulated federation: its state lives under the run's
    out-dir, in a folder per federation id, so a resumed simulation finds its ledger again
    and a fresh one starts with a fresh ledger.
    """
    config: dict[str, Any] = dict(context.node_config)
    if "data-dir" in config:
        node_eps = float(config.get("max-epsilon", run.privacy.max_epsilon))
        node_delta = float(config.get("delta", run.privacy.delta))
        return NodeSettings(
            hospital=str(config.get("hospital", f"node-{context.node_id}")),
            data_dir=Path(str(config["data-dir"])),
            max_epsilon=min(node_eps, run.privacy.max_epsilon),
            delta=min(node_delta, run.privacy.delta),
            device=str(config.get("device", run.runtime.device)),
            state_dir=Path(str(config["state-dir"])) if config.get("state-dir") else None,
            reproducible_noise=False,
        )
    partition = int(config["partition-id"])
    cohort_dir = str(context.run_config.get("cohort-dir", ""))
    if not cohort_dir:  # `flwr run .` with no cohort: each simulated node writes its demo share
        cohort_dir = str(Path(str(context.run_config.get("out-dir", "mindfed-out"))) / "cohort")
        ensure_demo_hospital(run, Path(cohort_dir), partition, int(config["num-partitions"]))
    folders = hospital_folders(Path(cohort_dir))
    if partition >= len(folders):
        raise ValueError(f"simulated node {partition} has no hospital folder (found {len(folders)})")
    out_dir = Path(str(context.run_config.get("out-dir", "mindfed-out")))
    hospital = folders[partition].name
    return NodeSettings(
        hospital=hospital,
        data_dir=folders[partition],
        max_epsilon=run.privacy.max_epsilon,
        delta=run.privacy.delta,
        device=run.runtime.device,
        state_dir=out_dir / "state" / "nodes" / federation_id / hospital if federation_id else None,
        reproducible_noise=True,
    )


def ensure_demo_hospital(run: RunSettings, cohort_dir: Path, partition: int, n_partitions: int) -> None:
    """Write this node's share of the seeded demo cohort unless it is already there."""
    from simulation.cohort import write_cohort_folder
    from simulation.partition import demo_partitions

    folder = cohort_dir / f"hospital-{partition + 1}"
    if not folder.is_dir():
        write_cohort_folder(demo_partitions(run, n_partitions)[1][partition], folder)


def hospital_folders(cohort_dir: Path) -> list[Path]:
    """A simulated federation's hospitals: the sub-folders of `cohort_dir`, sorted by name."""
    if not cohort_dir.is_dir():
        raise NotADirectoryError(f"cohort folder {cohort_dir} not found")
    folders = [p for p in cohort_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(folders, key=_natural_key)


def _natural_key(path: Path) -> list[int | str]:
    """'hospital-2' before 'hospital-10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _state(context: Context) -> ConfigRecord:
    if STATE_KEY not in context.state.config_records:
        context.state[STATE_KEY] = ConfigRecord()
    return context.state.config_records[STATE_KEY]


def load_ledger(context: Context, node: NodeSettings) -> PrivacyLedger:
    """The node's state folder wins (it survives restarts), then the run Context's state."""
    text: str | None = None
    ledger_file = node.state_dir / "ledger.json" if node.state_dir else None
    if ledger_file is not None and ledger_file.is_file():
        text = ledger_file.read_text(encoding="utf-8")
    elif "ledger" in _state(context):
        text = str(_state(context)["ledger"])
    if text is None:
        return PrivacyLedger(max_epsilon=node.max_epsilon, delta=node.delta)
    return PrivacyLedger.from_json(text, max_epsilon=node.max_epsilon, delta=node.delta)


def save_ledger(context: Context, node: NodeSettings, ledger: PrivacyLedger) -> None:
    _state(context)["ledger"] = ledger.to_json()
    if node.state_dir is not None:
        ledger.save(node.state_dir / "ledger.json")


def load_plan(context: Context, node: NodeSettings, key: str) -> dict[str, Any] | None:
    """A model's privacy plan in this federation ({"target": epsilon, "sigma": ...}), if made."""
    if key in _state(context):
        return json.loads(str(_state(context)[key]))
    plans = _read_plans(node)
    return plans.get(key)


def save_plan(context: Context, node: NodeSettings, key: str, plan: dict[str, Any]) -> None:
    """Kept with the ledger: a restarted node or a resumed run keeps the same target epsilon."""
    _state(context)[key] = json.dumps(plan)
    if node.state_dir is not None:
        plans = _read_plans(node) | {key: plan}
        atomic_write_text(node.state_dir / "plans.json", json.dumps(plans, indent=1))


def _read_plans(node: NodeSettings) -> dict[str, dict[str, float]]:
    path = node.state_dir / "plans.json" if node.state_dir else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))
