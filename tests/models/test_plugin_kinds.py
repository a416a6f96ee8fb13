"""A tiny model of each kind, registered here and run through Flower's simulation by one stage entry.

Nothing outside this module knows these models: the registry takes them (in the simulated nodes'
worker processes too, through MINDFED_MODEL_PLUGINS naming this module), the plan names them,
and the server walks the plan by kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.base import FitReport, LocalData, LocalRound, ModelKind, contract_problems
from models.encoder import TabularEncoder
from models.registry import PLUGINS_ENV, register, registered_models
from models.releases.counts import HISTOGRAMS
from models.sequence.encoder import SequenceEncoder
from privacy.dp_training import dp_training

THIS_MODULE = "tests.models.test_plugin_kinds"


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _config(config: Any) -> _NoParams:
    return config if isinstance(config, _NoParams) else _NoParams(**(config or {}))


def _load(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    if set(state) != set(target):
        raise KeyError(f"expected {sorted(target)}, got {sorted(state)}")
    for key, value in state.items():
        target[key].copy_(value)


class _Mean(nn.Linear):
    """One learnt vector (weight + bias on a constant input), the same for every record: its DP-SGD
    fit on squared errors is the members' mean. A Linear, so Opacus has its per-record gradients."""

    def __init__(self, dim: int, start: float = 0.0):
        super().__init__(1, dim)
        with torch.no_grad():
            self.weight.zero_()
            self.bias.fill_(start)

    def vector(self) -> np.ndarray:
        with torch.no_grad():
            return (self.weight[:, 0] + self.bias).numpy()


def _fit_mean(module: _Mean, rows: torch.Tensor, plan: LocalRound) -> tuple[_Mean, FitReport]:
    """DP-SGD of the mean vector towards the members' rows (per-record squared error)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(rows), batch_size=plan.batch_size)
    report = FitReport()
    with dp_training(
        module=module, optimizer=optimizer, data_loader=loader, dp=plan.dp, epochs=plan.epochs
    ) as session:
        for _ in range(plan.epochs):
            for (x,) in session.data_loader:
                session.optimizer.zero_grad(set_to_none=True)
                ((session.module(torch.ones(len(x), 1)) - x) ** 2).sum().backward()
                session.optimizer.step()
                report.steps += 1
                report.records_seen += len(x)
    return session.module, report


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@register("tiny-marginals")
class TinyMarginals:
    """Statistics generator: every column drawn on its own from the merged DP histograms."""

    kind = ModelKind.STATISTICS_GENERATOR
    releases: ClassVar[tuple[str, ...]] = (HISTOGRAMS,)
    phases: ClassVar[tuple[str, ...]] = ()
    Config = _NoParams

    def __init__(self, encoder: TabularEncoder, config: Any, *, seed: int = 0):
        self.encoder, self.config = encoder, _config(config)
        self.probabilities = {
            b.name: torch.full((b.width,), 1.0 / b.width) for b in encoder.categorical_blocks()
        }

    def measurement_weights(self) -> tuple[float, ...]:
        return ()  # the handshake's histograms are all it needs

    def select_measurements(self, round_index: int, statistics: dict[str, Any]) -> list[tuple[str, ...]]:
        return []

    def measurement_table_cells(self, round_index: int) -> int | None:
        return None

    def observe(self, tables: dict[str, np.ndarray], noise_sd: float) -> None:
        raise AssertionError("no measurement rounds were planned")

    def fit_statistics(self, statistics: dict[str, Any]) -> None:
        for name in self.probabilities:
            counts = np.clip(statistics[HISTOGRAMS][name], 0.0, None) + 1e-9
            self.probabilities[name] = torch.as_tensor(counts / counts.sum(), dtype=torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"p.{k}": v.clone() for k, v in self.probabilities.items()}

    def sampler_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        _load({f"p.{k}": v for k, v in self.probabilities.items()}, state)

    def sample(self, n: int, *, seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        rows = np.zeros((n, self.encoder.width), dtype=np.float32)
        for block in self.encoder.blocks:
            if block.kind == "categorical":
                p = self.probabilities[block.name].double().numpy()
                rows[np.arange(n), block.start + rng.choice(block.width, size=n, p=p / p.sum())] = 1.0
            else:
                rows[:, block.start] = rng.normal(size=n)
        return self.encoder.inverse_transform(rows)


@register("tiny-mean-generator")
class TinyMeanGenerator(TinyMarginals):
    """Federated generator: the members' mean encoded row (DP-SGD) plus noise, decoded."""

    kind = ModelKind.FEDERATED_GENERATOR
    releases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, encoder: TabularEncoder, config: Any, *, seed: int = 0):
        self.encoder, self.config = encoder, _config(config)
        self.mean = _Mean(encoder.width)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _state(self.mean)

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        self.mean.load_state_dict(state, strict=True)

    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        self.mean, report = _fit_mean(self.mean, torch.from_numpy(data.profiles), plan)
        return report

    def sample(self, n: int, *, seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        rows = self.mean.vector() + rng.normal(0.0, 0.3, (n, self.encoder.width))
        return self.encoder.inverse_transform(rows.astype(np.float32))


@register("tiny-mean-week")
class TinyMeanWeek:
    """Sequence generator: the members' mean week (DP-SGD) for every profile, plus noise."""

    kind = ModelKind.SEQUENCE_GENERATOR
    releases: ClassVar[tuple[str, ...]] = ()
    phases: ClassVar[tuple[str, ...]] = ()
    Config = _NoParams

    def __init__(self, encoder: TabularEncoder, config: Any, *, seed: int = 0):
        self.encoder, self.config = encoder, _config(config)
        self.weeks = SequenceEncoder.from_schema(encoder.schema)
        self.mean = _Mean(self.weeks.spec.length * self.weeks.n_channels, start=0.5)

    state_dict = TinyMeanGenerator.state_dict
    load_state_dict = TinyMeanGenerator.load_state_dict
    sampler_state_dict = TinyMeanGenerator.state_dict

    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        assert data.weeks is not None, "a sequence model is given the members' weeks"
        rows = torch.from_numpy(data.weeks.reshape(len(data.weeks), -1).astype(np.float32))
        self.mean, report = _fit_mean(self.mean, rows, plan)
        return report

    def sample_encoded(self, cond: np.ndarray, *, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        shape = (len(cond), self.weeks.spec.length, self.weeks.n_channels)
        week = self.mean.vector().reshape(shape[1:])
        return np.clip(week + rng.normal(0.0, 0.05, shape), 0.0, 1.0).astype(np.float32)

    def sample(self, static: pd.DataFrame | np.ndarray, *, seed: int) -> pd.DataFrame:
        ids = static[self.encoder.schema.id_column]
        return self.weeks.inverse_transform(self.sample_encoded(np.zeros((len(static), 1)), seed=seed), ids)


@register("tiny-logistic-risk")
class TinyLogisticRisk:
    """Risk model: multinomial logistic regression on the profile without its label block."""

    kind = ModelKind.RISK_MODEL
    releases: ClassVar[tuple[str, ...]] = ()
    phases: ClassVar[tuple[str, ...]] = ()
    Config = _NoParams

    def __init__(self, encoder: TabularEncoder, config: Any, *, seed: int = 0):
        self.encoder, self.config = encoder, _config(config)
        label = next(b for b in encoder.blocks if b.name == encoder.schema.label_column)
        self.label = slice(label.start, label.start + label.width)
        torch.manual_seed(seed)
        self.linear = nn.Linear(encoder.width - label.width, label.width)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _state(self.linear)

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        self.linear.load_state_dict(state, strict=True)

    def _split(self, profiles: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.delete(profiles, np.r_[self.label], axis=1).astype(np.float32))
        return x, torch.from_numpy(profiles[:, self.label].argmax(axis=1))

    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        x, y = self._split(data.profiles)
        optimizer = torch.optim.SGD(self.linear.parameters(), lr=0.05)
        loader = DataLoader(TensorDataset(x, y), batch_size=plan.batch_size)
        report = FitReport()
        with dp_training(
            module=self.linear, optimizer=optimizer, data_loader=loader, dp=plan.dp, epochs=plan.epochs
        ) as session:
            for _ in range(plan.epochs):
                for xb, yb in session.data_loader:
                    session.optimizer.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(session.module(xb), yb, reduction="sum").backward()
                    session.optimizer.step()
                    report.steps += 1
        self.linear = session.module
        return report

    def predict_proba(self, data: LocalData) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self.linear(self._split(data.profiles)[0]), dim=1).numpy()


TINY_MODELS = ("tiny-marginals", "tiny-mean-generator", "tiny-mean-week", "tiny-logistic-risk")


@pytest.mark.parametrize("name", TINY_MODELS)
def test_each_tiny_model_keeps_its_kinds_contract(name: str) -> None:
    from models.registry import get_model_class

    assert name in registered_models()
    assert contract_problems(get_model_class(name)) == []


TINY_RUN = {
    "federation.patients": 300,
    "federation.hospitals": 2,
    "federation.batch_size": 32,
    "export.synthetic_rows": 300,
    "export.round_sample_rows": 100,
    "audit.synthetic_rows": 200,
    "audit.bootstrap": 20,
    # tiny cohorts: the audit's verdict is chance; the release is what these tests check
    "audit.release_on_fail": True,
    "risk.synthetic_models": [],
}
# Each tiny model enters the plan as one [[stages]] entry; dp-ctgan is kept small where it stays.
PLANS = {
    "statistics+sequence+risk": [
        {"model": "tiny-marginals"},
        {"model": "tiny-mean-week", "rounds": 1, "epsilon_share": 0.3},
        {"model": "tiny-logistic-risk", "rounds": 1, "epsilon_share": 0.3},
    ],
    "federated": [{"model": "tiny-mean-generator", "rounds": 2, "epsilon_share": 0.6}],
}


@pytest.mark.integration
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_a_tiny_model_of_each_kind_runs_through_a_simulated_federation(
    plan: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulation.runner import simulate

    monkeypatch.setenv(PLUGINS_ENV, THIS_MODULE)  # the simulated nodes' workers register them too
    outcome = simulate(config=None, overrides={**TINY_RUN, "stages": PLANS[plan]}, out_dir=tmp_path)
    metrics = outcome.metrics
    stages = [s["model"] for s in PLANS[plan]]
    trained = {r["stage"] for r in metrics["rounds"] if r["aggregated"] and not r["rejected"]}
    assert trained == {s["model"] for s in PLANS[plan] if s.get("rounds")}
    for hospital in metrics["hospitals"]:  # every round model's DP-SGD was charged, within budget
        assert 0 < hospital["epsilon"] <= 5.0 + 1e-9
        assert hospital["rounds_trained"] == sum(s.get("rounds", 0) for s in PLANS[plan])
    card = json.loads((tmp_path / "bundle" / "model_card.json").read_text())
    assert card["model"] == stages[0]
    assert len(pd.read_csv(tmp_path / "synthetic" / "static.csv")) > 0
    if "tiny-mean-week" in stages:
        assert (tmp_path / "bundle" / "sequence" / "model_card.json").is_file()
        assert (tmp_path / "synthetic" / "timeseries.csv").is_file()
    if "tiny-logistic-risk" in stages:
        risk = json.loads(
            (tmp_path / "bundle" / "risk" / "tiny-logistic-risk" / "model_card.json").read_text()
        )
        assert risk["model"] == "tiny-logistic-risk"
