"""Tests for privacy.ledger (one RDP accountant per hospital) and the node's ledger persistence."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.node import load_ledger, node_settings, save_ledger
from configs.settings import RunSettings, load_settings
from privacy.facade import gaussian_noise_multiplier, make_private, release_noisy_histograms
from privacy.ledger import BudgetExceededError, PrivacyLedger

DELTA = 1e-5


def _fresh_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    accountant = RDPAccountant()
    accountant.history = [tuple(step) for step in history]
    return float(accountant.get_epsilon(delta=delta))


def _total_steps(ledger: PrivacyLedger) -> int:
    return sum(int(steps) for _, _, steps in ledger.accountant.history)


def _tiny_private_training(ledger: PrivacyLedger, *, noise_multiplier: float = 1.0):
    """A real Opacus DP-SGD set-up on nn.Linear, wired to `ledger` through the facade."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    loader = DataLoader(data, batch_size=10)  # 4 batches -> sample rate 1/4
    return make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        clipping_norm=1.0,
        ledger=ledger,
    )


def _one_step(training, x: torch.Tensor, y: torch.Tensor) -> None:
    training.optimizer.zero_grad()
    loss = ((training.module(x) - y) ** 2).sum()
    loss.backward()
    training.optimizer.step()


# --- epsilon over a sequence of charges ----------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_epsilon_is_monotone_over_gaussian_and_dp_sgd_charges() -> None:
    ledger = PrivacyLedger(max_epsilon=50.0, delta=DELTA)
    assert ledger.spent() == 0.0
    figures = [ledger.spent()]

    ledger.charge_gaussian("handshake statistics", noise_multiplier=8.0)
    figures.append(ledger.spent())

    training = _tiny_private_training(ledger, noise_multiplier=1.0)
    assert training.sample_rate == pytest.approx(0.25)
    history_before = list(ledger.accountant.history)
    steps_before = _total_steps(ledger)
    n_steps = 0
    for x, y in training.data_loader:
        _one_step(training, x, y)
        n_steps += 1
        figures.append(ledger.spent())
    assert n_steps > 0
    # Opacus's own step hook charged the ledger's accountant: nothing was recorded by hand.
    assert len(ledger.accountant.history) > len(history_before)
    assert _total_steps(ledger) == steps_before + n_steps
    assert ledger.accountant.history[-1] == (1.0, training.sample_rate, n_steps)
    assert ledger.spent() > figures[1]

    entry = ledger.record_training(
        "round 1", noise_multiplier=1.0, sample_rate=training.sample_rate, steps=n_steps
    )
    assert entry.mechanism == "dp-sgd"
    assert entry.epsilon_after == pytest.approx(ledger.spent())

    ledger.charge_gaussian("second release", noise_multiplier=20.0)
    figures.append(ledger.spent())

    assert all(b >= a for a, b in itertools.pairwise(figures)), figures
    assert figures[-1] > figures[0]
    after = [e.epsilon_after for e in ledger.entries]
    assert [e.mechanism for e in ledger.entries] == ["gaussian", "dp-sgd", "gaussian"]
    assert all(b >= a for a, b in itertools.pairwise(after))
    # The ledger's figure is exactly what a fresh Opacus accountant says for the same history.
    assert ledger.spent() == _fresh_epsilon(ledger.accountant.history)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dp_sgd_steps_compose_with_an_earlier_restored_history() -> None:
    earlier = PrivacyLedger(max_epsilon=50.0, delta=DELTA)
    earlier.charge_gaussian("handshake statistics", noise_multiplier=6.0)
    ledger = PrivacyLedger.from_json(earlier.to_json(), max_epsilon=50.0, delta=DELTA)
    start = ledger.spent()

    training = _tiny_private_training(ledger, noise_multiplier=1.5)
    x, y = next(iter(training.data_loader))
    _one_step(training, x, y)

    assert ledger.accountant.history[0] == (6.0, 1.0, 1)
    assert ledger.accountant.history[-1] == (1.5, training.sample_rate, 1)
    assert ledger.spent() > start
    assert ledger.spent() == _fresh_epsilon(ledger.accountant.history)


def test_spent_matches_a_fresh_rdp_accountant() -> None:
    ledger = PrivacyLedger(max_epsilon=100.0, delta=DELTA)
    ledger.charge_gaussian("a", noise_multiplier=3.0)
    ledger.charge_gaussian("b", noise_multiplier=3.0)
    ledger.accountant.step(noise_multiplier=1.1, sample_rate=0.02)
    reference = RDPAccountant()
    reference.step(noise_multiplier=3.0, sample_rate=1.0)
    reference.step(noise_multiplier=3.0, sample_rate=1.0)
    reference.step(noise_multiplier=1.1, sample_rate=0.02)
    assert ledger.accountant.history == reference.history
    assert ledger.spent() == reference.get_epsilon(delta=DELTA)
    assert ledger.remaining() == pytest.approx(100.0 - ledger.spent())


# --- refusals -------------------------------------------------------------------------------


def test_check_refuses_a_charge_past_max_epsilon_and_charges_nothing() -> None:
    ledger = PrivacyLedger(max_epsilon=1.5, delta=DELTA)
    ledger.charge_gaussian("handshake statistics", noise_multiplier=10.0)
    history, entries, spent = list(ledger.accountant.history), list(ledger.entries), ledger.spent()
    assert spent < 1.5

    with pytest.raises(BudgetExceededError, match=r"max epsilon 1\.5") as info:
        ledger.check("round 3", noise_multiplier=0.8, sample_rate=0.5, steps=500)
    assert "round 3" in str(info.value)
    with pytest.raises(BudgetExceededError, match=r"max epsilon 1\.5"):
        ledger.charge_gaussian("too much", noise_multiplier=0.5)

    assert ledger.accountant.history == history
    assert ledger.entries == entries
    assert ledger.spent() == spent


def test_check_accepts_a_fitting_charge_without_charging() -> None:
    ledger = PrivacyLedger(max_epsilon=5.0, delta=DELTA)
    after = ledger.check("round 1", noise_multiplier=1.0, sample_rate=0.01, steps=100)
    assert 0.0 < after <= 5.0
    assert after == ledger.epsilon_if(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    assert ledger.accountant.history == []
    assert ledger.spent() == 0.0


# --- calibration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "sample_rate", "steps", "prior_sigma"),
    # One subsampled DP-SGD case (each epsilon_if costs ~50 ms there), then cheap full-batch ones.
    [(3.0, 0.05, 100, None), (1.0, 1.0, 5, None), (4.0, 1.0, 20, 5.0)],
)
def test_calibrated_noise_multiplier_fits_and_is_tight(
    target: float, sample_rate: float, steps: int, prior_sigma: float | None
) -> None:
    ledger = PrivacyLedger(max_epsilon=10.0, delta=DELTA)
    if prior_sigma is not None:
        ledger.charge_gaussian("handshake statistics", noise_multiplier=prior_sigma)
    sigma = ledger.calibrate_noise_multiplier(target_epsilon=target, sample_rate=sample_rate, steps=steps)
    assert sigma > 0.31  # an interior solution, not the search floor
    assert ledger.epsilon_if(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps) <= target
    assert ledger.epsilon_if(noise_multiplier=0.98 * sigma, sample_rate=sample_rate, steps=steps) > target


def test_calibration_never_exceeds_the_ledgers_own_max() -> None:
    ledger = PrivacyLedger(max_epsilon=1.0, delta=DELTA)
    sigma = ledger.calibrate_noise_multiplier(target_epsilon=50.0, sample_rate=1.0, steps=10)
    assert ledger.epsilon_if(noise_multiplier=sigma, sample_rate=1.0, steps=10) <= 1.0
    assert ledger.epsilon_if(noise_multiplier=0.98 * sigma, sample_rate=1.0, steps=10) > 1.0


def test_calibration_raises_when_even_a_huge_sigma_cannot_fit() -> None:
    ledger = PrivacyLedger(max_epsilon=5.0, delta=DELTA)
    with pytest.raises(BudgetExceededError, match="max epsilon 5"):
        ledger.calibrate_noise_multiplier(target_epsilon=1e-6, sample_rate=1.0, steps=1000)

    spent_ledger = PrivacyLedger(max_epsilon=1.0, delta=DELTA)
    spent_ledger.charge_gaussian("everything", noise_multiplier=4.9)
    history = list(spent_ledger.accountant.history)
    with pytest.raises(BudgetExceededError):
        spent_ledger.calibrate_noise_multiplier(
            target_epsilon=spent_ledger.spent() * 0.99, sample_rate=0.01, steps=10
        )
    assert spent_ledger.accountant.history == history


@pytest.mark.parametrize("epsilon", [0.3, 1.0, 2.5])
def test_gaussian_noise_multiplier_spends_the_target_epsilon(epsilon: float) -> None:
    sigma = gaussian_noise_multiplier(epsilon=epsilon, delta=DELTA)
    single = PrivacyLedger(max_epsilon=100.0, delta=DELTA)
    single.charge_gaussian("release", noise_multiplier=sigma)
    assert single.spent() == pytest.approx(epsilon, rel=1e-3)
    assert single.spent() <= epsilon
    # Smaller epsilon needs more noise.
    assert gaussian_noise_multiplier(epsilon=epsilon / 2, delta=DELTA) > sigma


# --- noisy histograms ----------------------------------------------------------------------


def _zero_counts(n_columns: int, n_cells: int) -> dict[str, np.ndarray]:
    return {f"col{i}": np.full(n_cells, 10.0) for i in range(n_columns)}


def test_release_noisy_histograms_charges_exactly_once() -> None:
    ledger = PrivacyLedger(max_epsilon=5.0, delta=DELTA)
    counts = _zero_counts(3, 20)
    noisy = release_noisy_histograms(counts, ledger=ledger, epsilon=0.5, rng=np.random.default_rng(0))

    assert set(noisy) == set(counts)
    assert all(noisy[k].shape == counts[k].shape for k in counts)
    assert not any(np.array_equal(noisy[k], counts[k]) for k in counts)
    assert len(ledger.entries) == 1
    assert ledger.entries[0].mechanism == "gaussian"
    assert ledger.entries[0].steps == 1
    assert _total_steps(ledger) == 1
    assert ledger.spent() == pytest.approx(0.5, rel=1e-3)


def test_release_noisy_histograms_refuses_past_budget_and_charges_nothing() -> None:
    ledger = PrivacyLedger(max_epsilon=0.4, delta=DELTA)
    with pytest.raises(BudgetExceededError):
        release_noisy_histograms(_zero_counts(2, 5), ledger=ledger, epsilon=0.5, rng=np.random.default_rng(0))
    assert ledger.accountant.history == []
    assert ledger.entries == []


def test_histogram_noise_scale_grows_with_sqrt_of_column_count() -> None:
    epsilon = 1.0
    z = gaussian_noise_multiplier(epsilon=epsilon, delta=DELTA)
    cells = 20_000
    stds = {}
    for n_columns in (1, 16):
        ledger = PrivacyLedger(max_epsilon=10.0, delta=DELTA)
        counts = _zero_counts(n_columns, cells // n_columns)
        noisy = release_noisy_histograms(
            counts, ledger=ledger, epsilon=epsilon, rng=np.random.default_rng(1234)
        )
        noise = np.concatenate([noisy[k] - counts[k] for k in counts])
        assert abs(noise.mean()) < 0.05 * z * math.sqrt(n_columns)
        stds[n_columns] = float(noise.std())
        # Same epsilon per release whatever the column count: the noise absorbs the sensitivity.
        assert ledger.spent() == pytest.approx(epsilon, rel=1e-3)
    assert stds[1] == pytest.approx(z, rel=0.05)
    assert stds[16] == pytest.approx(4 * z, rel=0.05)
    assert stds[16] / stds[1] == pytest.approx(4.0, rel=0.1)


# --- persistence ---------------------------------------------------------------------------


def _used_ledger(max_epsilon: float = 5.0) -> PrivacyLedger:
    ledger = PrivacyLedger(max_epsilon=max_epsilon, delta=DELTA)
    ledger.charge_gaussian("handshake statistics", noise_multiplier=9.0)
    ledger.accountant.step(noise_multiplier=1.2, sample_rate=0.05)
    ledger.accountant.step(noise_multiplier=1.2, sample_rate=0.05)
    ledger.record_training("round 1", noise_multiplier=1.2, sample_rate=0.05, steps=2)
    return ledger


def test_json_round_trip_keeps_spent_and_entries() -> None:
    ledger = _used_ledger()
    text = ledger.to_json()
    json.loads(text)  # plain JSON
    restored = PrivacyLedger.from_json(text, max_epsilon=5.0, delta=DELTA)
    assert restored.spent() == ledger.spent()
    assert restored.accountant.history == ledger.accountant.history
    assert restored.entries == ledger.entries
    assert restored.to_json() == text


def test_from_json_refuses_a_different_delta() -> None:
    text = _used_ledger().to_json()
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger.from_json(text, max_epsilon=5.0, delta=1e-6)


def test_from_json_lets_the_nodes_max_epsilon_win() -> None:
    ledger = _used_ledger(max_epsilon=5.0)
    restored = PrivacyLedger.from_json(ledger.to_json(), max_epsilon=2.0, delta=DELTA)
    assert restored.max_epsilon == 2.0
    assert restored.spent() == ledger.spent()
    assert restored.remaining() == pytest.approx(max(0.0, 2.0 - ledger.spent()))
    with pytest.raises(BudgetExceededError, match="max epsilon 2"):
        restored.check("big round", noise_multiplier=0.7, sample_rate=0.2, steps=200)
    # ...and a larger node figure wins too (the stored value is never trusted).
    assert PrivacyLedger.from_json(ledger.to_json(), max_epsilon=7.0, delta=DELTA).max_epsilon == 7.0


def test_save_writes_a_parseable_file(tmp_path: Path) -> None:
    ledger = _used_ledger()
    path = tmp_path / "state" / "ledger.json"
    ledger.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]
    restored = PrivacyLedger.from_json(path.read_text(encoding="utf-8"), max_epsilon=5.0, delta=DELTA)
    assert restored.spent() == ledger.spent()


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.json"
    old = PrivacyLedger(max_epsilon=5.0, delta=DELTA)
    old.charge_gaussian("handshake statistics", noise_multiplier=9.0)
    old.save(path)
    before = path.read_bytes()

    newer = _used_ledger()
    newer.charge_gaussian("later", noise_multiplier=9.0)

    def crash(src, dst, *args, **kwargs):
        raise OSError("disk vanished mid-rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        newer.save(path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]
    restored = PrivacyLedger.from_json(path.read_text(encoding="utf-8"), max_epsilon=5.0, delta=DELTA)
    assert restored.spent() == old.spent()


# --- the node's settings and its persisted ledger ------------------------------------------


@pytest.fixture(scope="module")
def run_settings() -> RunSettings:
    settings = load_settings(overrides={"privacy.max_epsilon": 5.0, "privacy.delta": 1e-5})
    assert settings.privacy.max_epsilon == 5.0
    return settings


def _context(node_config: dict, run_config: dict | None = None, node_id: int = 42) -> Context:
    return Context(
        run_id=1,
        node_id=node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config or {},
    )


def test_node_max_epsilon_below_the_runs_wins(tmp_path: Path, run_settings: RunSettings) -> None:
    ctx = _context(
        {
            "data-dir": str(tmp_path),
            "max-epsilon": 2.0,
            "delta": 1e-5,
            "state-dir": str(tmp_path / "state"),
            "hospital": "st-mary",
        }
    )
    node = node_settings(ctx, run_settings)
    assert node.max_epsilon == 2.0
    assert node.hospital == "st-mary"
    assert node.data_dir == tmp_path
    assert node.reproducible_noise is False
    assert node.state_dir == tmp_path / "state"


def test_server_cannot_raise_a_nodes_budget_but_can_lower_it(
    tmp_path: Path, run_settings: RunSettings
) -> None:
    ctx = _context(
        {"data-dir": str(tmp_path), "max-epsilon": 8.0, "delta": 1e-3, "state-dir": str(tmp_path / "state")}
    )
    node = node_settings(ctx, run_settings)
    assert node.max_epsilon == 5.0
    assert node.delta == 1e-5  # min(node, run) as well
    assert node.hospital == "node-42"


def _cohort_dir(root: Path, n_hospitals: int) -> Path:
    """The demo layout: one data-contract folder per hospital, named hospital-1 ... hospital-N."""
    for index in range(1, n_hospitals + 1):
        (root / f"hospital-{index}").mkdir(parents=True)
    (root / ".hidden").mkdir()  # not a hospital
    return root


def test_simulation_context_maps_partition_to_hospital_folder(
    tmp_path: Path, run_settings: RunSettings
) -> None:
    cohort_dir = _cohort_dir(tmp_path / "cohort", 3)
    for partition in range(3):
        ctx = _context({"partition-id": partition, "num-partitions": 3}, {"cohort-dir": str(cohort_dir)})
        node = node_settings(ctx, run_settings)
        assert node.hospital == f"hospital-{partition + 1}"
        assert node.data_dir == cohort_dir / f"hospital-{partition + 1}"
        assert node.max_epsilon == run_settings.privacy.max_epsilon
        assert node.delta == run_settings.privacy.delta
        assert node.reproducible_noise is True
        assert node.state_dir is None


def test_simulation_partition_without_a_folder_is_refused(tmp_path: Path, run_settings: RunSettings) -> None:
    cohort_dir = _cohort_dir(tmp_path / "cohort", 2)
    ctx = _context({"partition-id": 2, "num-partitions": 3}, {"cohort-dir": str(cohort_dir)})
    with pytest.raises(ValueError, match="no hospital folder"):
        node_settings(ctx, run_settings)


def test_simulation_partition_maps_to_hospital_pid_plus_one_with_ten_or_more_hospitals(
    tmp_path: Path, run_settings: RunSettings
) -> None:
    cohort_dir = _cohort_dir(tmp_path / "cohort", 12)
    ctx = _context({"partition-id": 1, "num-partitions": 12}, {"cohort-dir": str(cohort_dir)})
    node = node_settings(ctx, run_settings)
    assert node.hospital == "hospital-2"
    assert node.data_dir == cohort_dir / "hospital-2"


def test_ledger_survives_a_node_restart_through_its_state_dir(
    tmp_path: Path, run_settings: RunSettings
) -> None:
    node_config = {
        "data-dir": str(tmp_path / "data"),
        "state-dir": str(tmp_path / "state"),
        "max-epsilon": 3.0,
        "delta": 1e-5,
    }
    first = _context(dict(node_config))
    node = node_settings(first, run_settings)
    assert node.state_dir == tmp_path / "state"
    ledger = load_ledger(first, node)
    assert ledger.spent() == 0.0
    ledger.charge_gaussian("handshake statistics", noise_multiplier=7.0)
    save_ledger(first, node, ledger)
    assert (tmp_path / "state" / "ledger.json").is_file()

    restarted = _context(dict(node_config))  # new process: empty Context state
    again = load_ledger(restarted, node_settings(restarted, run_settings))
    assert again.spent() == ledger.spent() > 0.0
    assert again.entries == ledger.entries
    assert again.max_epsilon == 3.0


def test_ledger_survives_rounds_through_the_context_state(tmp_path: Path, run_settings: RunSettings) -> None:
    config = {"data-dir": str(tmp_path), "max-epsilon": 5.0, "delta": 1e-5, "state-dir": str(tmp_path)}
    ctx = _context(config)
    # a node with no state folder (a simulated one outside a federation): Context state only
    node = node_settings(ctx, run_settings).model_copy(update={"state_dir": None})
    ledger = load_ledger(ctx, node)
    ledger.charge_gaussian("handshake statistics", noise_multiplier=7.0)
    save_ledger(ctx, node, ledger)
    assert list(tmp_path.iterdir()) == []  # no state-dir: nothing written to disk
    assert load_ledger(ctx, node).spent() == ledger.spent()
