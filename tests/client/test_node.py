"""A hospital node's own state: required config, ledger lock, holdout salt, fresh noise seeds."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.node import (
    HOLDOUT_SALT_BYTES,
    NodeConfigError,
    NodeSettings,
    _create_salt,
    fresh_noise_seed,
    holdout_salt,
    ledger_lock,
    node_settings,
)
from configs.settings import RunSettings, load_settings
from privacy.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5


@pytest.fixture(scope="module")
def run_settings() -> RunSettings:
    return load_settings(overrides={"privacy.max_epsilon": 5.0, "privacy.delta": DELTA})


def _context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(
        run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config=run_config or {}
    )


def _deployed_config(tmp_path: Path, **changes: object) -> dict:
    config: dict = {
        "data-dir": str(tmp_path / "data"),
        "state-dir": str(tmp_path / "state"),
        "max-epsilon": 3.0,
        "delta": 1e-6,
    }
    config.update(changes)
    return {key: value for key, value in config.items() if value is not None}


def _node(state_dir: Path | None, *, hospital: str = "st-mary", simulated: bool = False) -> NodeSettings:
    return NodeSettings(
        hospital=hospital,
        data_dir=Path("unused"),
        max_epsilon=5.0,
        delta=DELTA,
        device="cpu",
        state_dir=state_dir,
        reproducible_noise=simulated,
    )


# --- node_settings: a deployed node decides its own budget and keeps its own state ---------------


def test_complete_deployed_config_keeps_min_of_node_and_run(
    tmp_path: Path, run_settings: RunSettings
) -> None:
    node = node_settings(_context(_deployed_config(tmp_path)), run_settings)
    assert (node.max_epsilon, node.delta) == (3.0, 1e-6)  # the node's, both below the run's
    assert node.state_dir == tmp_path / "state"
    assert node.reproducible_noise is False
    loose = _deployed_config(tmp_path, **{"max-epsilon": 9.0, "delta": 1e-3})
    node = node_settings(_context(loose), run_settings)
    assert (node.max_epsilon, node.delta) == (5.0, DELTA)  # the run can only lower them


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("max-epsilon", "hospital, not the server, decides"),
        ("delta", "hospital, not the server, decides"),
        ("state-dir", "restart at epsilon 0 every run"),
    ],
)
def test_deployed_node_without_a_required_key_refuses_to_start(
    tmp_path: Path, run_settings: RunSettings, key: str, reason: str
) -> None:
    for absent in (None, ""):  # left out, or set to nothing
        with pytest.raises(NodeConfigError, match=key) as refused:
            node_settings(_context(_deployed_config(tmp_path, **{key: absent})), run_settings)
        assert reason in str(refused.value)
        assert isinstance(refused.value, ValueError)


def test_every_missing_key_is_named_at_once(tmp_path: Path, run_settings: RunSettings) -> None:
    with pytest.raises(NodeConfigError) as refused:
        node_settings(_context({"data-dir": str(tmp_path)}), run_settings)
    for key in ("max-epsilon", "delta", "state-dir"):
        assert key in str(refused.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max-epsilon", "lots"),
        ("max-epsilon", True),
        ("max-epsilon", 0.0),
        ("max-epsilon", -1.0),
        ("max-epsilon", float("inf")),
        ("max-epsilon", float("nan")),
        ("delta", "small"),
        ("delta", 0.0),
        ("delta", 1.0),
        ("delta", 1.5),
        ("delta", -1e-5),
        ("delta", float("nan")),
    ],
)
def test_bad_privacy_numbers_are_refused_with_the_key_named(
    tmp_path: Path, run_settings: RunSettings, key: str, value: object
) -> None:
    with pytest.raises(NodeConfigError, match=f"node config {key}="):
        node_settings(_context(_deployed_config(tmp_path, **{key: value})), run_settings)


def test_simulated_node_needs_none_of_the_deployed_keys(tmp_path: Path, run_settings: RunSettings) -> None:
    cohort = tmp_path / "cohort"
    (cohort / "hospital-1").mkdir(parents=True)
    ctx = _context({"partition-id": 0, "num-partitions": 1}, {"cohort-dir": str(cohort)})
    node = node_settings(ctx, run_settings)
    assert node.max_epsilon == run_settings.privacy.max_epsilon
    assert node.reproducible_noise is True
    assert node.state_dir is None


# --- ledger_lock: one run at a time between loading the ledger and saving it --------------------


def _try_lock(path: Path) -> bool:
    """Whether a second, independent open of `path` can take the exclusive lock right now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_ledger_lock_is_exclusive_while_held_and_released_after(tmp_path: Path) -> None:
    node = _node(tmp_path / "new" / "state")
    lock_file = tmp_path / "new" / "state" / "ledger.lock"
    with ledger_lock(node):
        assert lock_file.is_file()  # the state folder was created for it
        assert not _try_lock(lock_file)
    assert _try_lock(lock_file)
    with pytest.raises(RuntimeError), ledger_lock(node):
        raise RuntimeError("a failed charge")
    assert _try_lock(lock_file)  # released on the error path too


def test_ledger_lock_without_a_state_folder_is_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with ledger_lock(_node(None)):
        pass
    assert list(tmp_path.iterdir()) == []


_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flwr.app import Context, RecordDict
    from client.node import NodeSettings, ledger_lock, load_ledger, save_ledger

    state, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    node = NodeSettings(hospital="h", data_dir=state, max_epsilon=50.0, delta=1e-5, device="cpu",
                        state_dir=state, reproducible_noise=False)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    (state / f"ready-{name}").touch()
    while not (state / "go").exists():  # both start charging together, after their imports
        time.sleep(0.01)
    for k in range(n):
        with ledger_lock(node):
            ledger = load_ledger(context, node)
            ledger.charge_gaussian(f"{name}-{k}", noise_multiplier=20.0)
            time.sleep(0.05)  # a long charge: without the lock the other run would save over it
            save_ledger(context, node, ledger)
    """
)


def test_two_concurrent_runs_on_one_node_keep_every_charge(tmp_path: Path) -> None:
    state, n = tmp_path / "state", 6
    state.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(state), name, str(n)], cwd=ROOT, env=env)
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 120
    while not all((state / f"ready-{name}").exists() for name in "ab"):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "worker did not start"
        time.sleep(0.05)
    (state / "go").touch()
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    text = (state / "ledger.json").read_text(encoding="utf-8")
    ledger = PrivacyLedger.from_json(text, max_epsilon=50.0, delta=DELTA)
    assert sorted(e.what for e in ledger.entries) == sorted(f"{x}-{k}" for x in "ab" for k in range(n))
    # Opacus merges repeated identical steps into one history row: count the steps, not the rows
    assert sum(steps for _, _, steps in ledger.accountant.history) == 2 * n


# --- holdout_salt: which patients are held out stays secret on a deployed node -----------------


def test_deployed_salt_is_made_once_kept_and_owner_only(tmp_path: Path) -> None:
    node = _node(tmp_path / "state")
    salt = holdout_salt(node, run_seed=1)
    path = tmp_path / "state" / "holdout.salt"
    assert len(salt) == HOLDOUT_SALT_BYTES
    assert path.read_bytes() == salt
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert holdout_salt(node, run_seed=2) == salt  # the run's seed plays no part
    assert sorted(p.name for p in path.parent.iterdir()) == ["holdout.salt"]  # no temp file left


def test_two_deployed_nodes_get_different_salts(tmp_path: Path) -> None:
    first = holdout_salt(_node(tmp_path / "one"), run_seed=1)
    second = holdout_salt(_node(tmp_path / "two"), run_seed=1)
    assert first != second


def test_a_salt_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    (tmp_path / "holdout.salt").write_bytes(b"x" * 16)
    with pytest.raises(NodeConfigError, match="holds 16 bytes, not 32"):
        holdout_salt(_node(tmp_path), run_seed=1)
    assert (tmp_path / "holdout.salt").read_bytes() == b"x" * 16  # never silently replaced


def test_a_salt_made_by_another_run_first_is_kept(tmp_path: Path) -> None:
    theirs = b"t" * HOLDOUT_SALT_BYTES
    (tmp_path / "holdout.salt").write_bytes(theirs)
    _create_salt(tmp_path / "holdout.salt")  # lost the race: must not replace theirs
    assert (tmp_path / "holdout.salt").read_bytes() == theirs
    assert [p.name for p in tmp_path.iterdir()] == ["holdout.salt"]


def test_deployed_node_without_a_state_folder_has_no_salt() -> None:
    with pytest.raises(NodeConfigError, match="state-dir"):
        holdout_salt(_node(None), run_seed=1)


def test_simulated_salt_repeats_per_seed_and_hospital_and_writes_nothing(tmp_path: Path) -> None:
    node = _node(tmp_path, simulated=True)
    salt = holdout_salt(node, run_seed=7)
    assert len(salt) == HOLDOUT_SALT_BYTES
    assert holdout_salt(_node(tmp_path / "elsewhere", simulated=True), run_seed=7) == salt
    assert holdout_salt(node, run_seed=8) != salt
    assert holdout_salt(_node(tmp_path, hospital="st-jude", simulated=True), run_seed=7) != salt
    assert list(tmp_path.iterdir()) == []


# --- fresh_noise_seed ---------------------------------------------------------------------------


def test_fresh_noise_seeds_use_64_bits() -> None:
    seeds = [fresh_noise_seed() for _ in range(32)]
    assert all(isinstance(seed, int) and 0 <= seed < 2**64 for seed in seeds)
    assert len(set(seeds)) == len(seeds)
    # 32 draws all below 2**32 has probability 2**-1024: a 31- or 32-bit source would fail here
    assert max(seeds) >= 2**32
