"""Negative control for the privacy audit: a generator that leaks by design, registered by tests only.

Import this module (or name it in MINDFED_MODEL_PLUGINS for a simulated federation's workers) to
register `leaky-replay`; production code never imports it, so no run config can select it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.base import FitReport, LocalData, LocalRound, ModelKind
from models.encoder import TabularEncoder
from models.registry import register
from privacy.dp_training import DPSpec


@register("leaky-replay")
class LeakyReplay:
    """Memorises its training rows and replays them with small noise.

    It exists so a test can show the audit's gates fail on a generator that leaks: it takes
    no DP (the `dp` argument is ignored and nothing is charged), so a run with it must fail
    the DCR and membership-inference gates. Use with one hospital: averaging the memories of
    several hospitals would blur the very leak it is there to show.
    """

    registry_name = "leaky-replay"
    kind = ModelKind.FEDERATED_GENERATOR
    releases = ()
    phases = ()

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        capacity: int = Field(default=4000, ge=1)
        noise: float = Field(default=0.02, ge=0)  # std of the noise on replayed numeric cells

    def __init__(self, encoder: TabularEncoder, config: Config | dict, *, seed: int = 0):
        self.encoder = encoder
        self.config = config if isinstance(config, self.Config) else self.Config(**config)
        # Until fit, the memory holds seeded noise (and `filled` is 0): nothing is memorised yet.
        self.memory = torch.randn(
            self.config.capacity, encoder.width, generator=torch.Generator().manual_seed(seed)
        )
        self.filled = torch.zeros(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"memory": self.memory.clone(), "filled": self.filled.clone()}

    def sampler_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        unexpected = set(state) - {"memory", "filled"}
        if unexpected or {"memory", "filled"} - set(state):
            raise KeyError(f"leaky-replay state needs 'memory' and 'filled', got {sorted(state)}")
        self.memory, self.filled = state["memory"].clone(), state["filled"].clone()

    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        """Memorise the members (no DP: `plan.dp` is ignored and nothing is charged)."""
        return self.fit(
            data.profiles,
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            dp=None,
            device=plan.device,
            seed=plan.seed,
        )

    def fit(
        self,
        data: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        dp: DPSpec | None,
        device: torch.device,
        seed: int,
        pair_targets: dict[str, float] | None = None,  # the table-model contract; a replay ignores it
    ) -> FitReport:
        n = min(len(data), self.config.capacity)
        self.memory[:n] = torch.from_numpy(data[:n])
        self.filled = torch.tensor([float(n)])
        return FitReport(steps=1, records_seen=n)

    def sample(self, n: int, *, seed: int) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        filled = max(1, int(self.filled.item()))
        rows = self.memory[:filled].numpy()[rng.integers(0, filled, size=n)].copy()
        numeric = [b.start for b in self.encoder.blocks if b.kind == "numeric"]
        rows[:, numeric] += rng.normal(0.0, self.config.noise, size=(n, len(numeric)))
        return self.encoder.inverse_transform(rows)
