"""A hospital's own settings (node config) and its persisted state: the node is sovereign."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from pydantic import BaseModel, ConfigDict, Field

from configs.settings import RunSettings
from privacy.ledger import PrivacyLedger
from privacy.storage import atomic_write_text, fsync_directory

STATE_KEY = "mindfed"
HOLDOUT_SALT_BYTES = 32
# Why a deployed node will not start without each key: the node, not the server, is sovereign.
_REQUIRED_NODE_KEYS: dict[str, str] = {
    "max-epsilon": "the hospital, not the server, decides its own privacy budget",
    "delta": "the hospital, not the server, decides its own privacy budget",
    "state-dir": "without a state folder the ledger would restart at epsilon 0 every run",
}


class NodeConfigError(ValueError):
    """A deployed node's own config is missing or has a bad privacy setting; it will not start."""


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

    A deployed node needs `max-epsilon`, `delta` and `state-dir` in its own config (else
    NodeConfigError). The run's privacy figures can only lower the node's: min(node, run) for
    epsilon and delta. A deployed node's state folder is its own (one ledger for its data,
    across every run). A simulated hospital exists for one simulated federation: its state
    lives under the run's out-dir, in a folder per federation id, so a resumed simulation
    finds its ledger again and a fresh one starts with a fresh ledger.
    """
    config: dict[str, Any] = dict(context.node_config)
    if "data-dir" in config:
        return _deployed_node(context, config, run)
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


def _deployed_node(context: Context, config: dict[str, Any], run: RunSettings) -> NodeSettings:
    """A real hospital: its own budget and state folder are required, never defaulted from the run."""
    _require_node_keys(config)
    node_eps = _node_number(config, "max-epsilon", upper=None)
    node_delta = _node_number(config, "delta", upper=1.0)
    return NodeSettings(
        hospital=str(config.get("hospital", f"node-{context.node_id}")),
        data_dir=Path(str(config["data-dir"])),
        max_epsilon=min(node_eps, run.privacy.max_epsilon),
        delta=min(node_delta, run.privacy.delta),
        device=str(config.get("device", run.runtime.device)),
        state_dir=Path(str(config["state-dir"])),
        reproducible_noise=False,
    )


def _require_node_keys(config: dict[str, Any]) -> None:
    """Raise NodeConfigError naming every missing key and why each one is needed."""
    missing = [key for key in _REQUIRED_NODE_KEYS if config.get(key) in (None, "")]
    if missing:
        why: dict[str, list[str]] = {}
        for key in missing:
            why.setdefault(_REQUIRED_NODE_KEYS[key], []).append(key)
        reasons = "; ".join(f"{', '.join(keys)}: {reason}" for reason, keys in why.items())
        raise NodeConfigError(f"node config lacks {', '.join(missing)}, refusing to start ({reasons})")


def _node_number(config: dict[str, Any], key: str, *, upper: float | None) -> float:
    """The finite number at `key`, above 0 and (if `upper` is set) below `upper`."""
    value = config[key]
    try:
        # bool is an int to Python, but `max-epsilon=true` is a typo, not a budget
        number = float("nan") if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = float("nan")
    bound = f"between 0 and {upper:g} (exclusive)" if upper is not None else "a number above 0"
    if not math.isfinite(number) or number <= 0 or (upper is not None and number >= upper):
        raise NodeConfigError(f"node config {key}={value!r} is refused: it must be {bound}")
    return number


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


@contextmanager
def ledger_lock(node: NodeSettings) -> Iterator[None]:
    """Hold `<state_dir>/ledger.lock` exclusively from load to save: two runs never lose a charge."""
    if node.state_dir is None:  # the ledger lives in this run's Context only: nothing to share
        yield
        return
    node.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(node.state_dir / "ledger.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # flock, not a lock file's existence: the kernel drops it if the process dies mid-run
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def holdout_salt(node: NodeSettings, *, run_seed: int) -> bytes:
    """The key of the holdout split: secret and kept per deployed node, seeded in simulation."""
    if node.reproducible_noise:  # demo runs repeat; the simulated patients are not real
        return hashlib.sha256(f"mindfed-holdout:{run_seed}:{node.hospital}".encode()).digest()
    if node.state_dir is None:
        raise NodeConfigError("state-dir: a deployed node keeps its holdout salt there")
    # Secret: whoever knows the salt knows which patients were held out of training. Kept: a new
    # split each run would in time train on every patient, and the holdout would not be unseen.
    return _read_or_create_salt(node.state_dir / "holdout.salt")


def _read_or_create_salt(path: Path) -> bytes:
    """The salt in `path`, made once from the OS's CSPRNG if the file does not exist yet."""
    if not path.exists():
        _create_salt(path)
    salt = path.read_bytes()
    if len(salt) != HOLDOUT_SALT_BYTES:
        raise NodeConfigError(
            f"{path} holds {len(salt)} bytes, not {HOLDOUT_SALT_BYTES}: the holdout salt is damaged "
            "(restore it from backup; a new salt would move patients between training and holdout)"
        )
    return salt


def _create_salt(path: Path) -> None:
    """Write a fresh salt, owner-only (0o600), without ever showing a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(HOLDOUT_SALT_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        # link, unlike rename, never replaces: if another run made the salt first, theirs stays
        os.link(staging, path)
        fsync_directory(path.parent)
    except FileExistsError:
        pass
    finally:
        staging.unlink(missing_ok=True)


def fresh_noise_seed() -> int:
    """64 bits from the OS's CSPRNG: a 31-bit torch.seed() is few enough to search for the noise."""
    return secrets.randbits(64)


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
    """Into the run's Context and, where the node has a state folder, atomically onto disk."""
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
