"""Constants and helpers shared by the TimeGAN tests: tiny configs, one-call fits, stand-in data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from configs.schema import ChannelSpec, CohortSchema, ColumnSpec, SequenceSpec
from models.base import FitReport
from models.sequence.losses import _moments_loss
from models.sequence.moments import SequenceMoments
from models.sequence.timegan import TimeGAN

CPU = torch.device("cpu")
N = 80
BATCH = 20
DELTA = 1e-5
SIGMA = 1.0
# Tiny networks and a high learning rate: every fit below takes well under a second.
SMALL = {"hidden_dim": 8, "num_layers": 1, "noise_dim": 4, "learning_rate": 1e-2, "discriminator_lr": 1e-2}


def _public_moments(mean: float, sd: float) -> SequenceMoments:
    """Stand-in moments from public numbers only: 100 weeks drawn around `mean` (no record in them)."""
    rng = np.random.default_rng(123)
    return SequenceMoments.of(np.clip(rng.normal(mean, sd, (100, 7, 5)), 0.0, 1.0))


def _fit(model: TimeGAN, weeks: np.ndarray, cond: np.ndarray, phase: str, **kwargs: Any) -> FitReport:
    options = {"epochs": 1, "batch_size": BATCH, "dp": None, "device": CPU, "seed": 0, **kwargs}
    return model.fit(weeks, cond, phase=phase, **options)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _other_schema() -> CohortSchema:
    """A different cohort: two static columns, three channels, five days."""
    return CohortSchema(
        id_column="pid",
        label_column="group",
        columns=(
            ColumnSpec(name="score", kind="continuous", min=0.0, max=10.0),
            ColumnSpec(name="group", kind="categorical", categories=("a", "b")),
        ),
        sequence=SequenceSpec(
            day_column="visit",
            length=5,
            channels=(
                ChannelSpec(name="temp", min=35.0, max=42.0),
                ChannelSpec(name="mood", min=-5.0, max=5.0),
                ChannelSpec(name="calls", min=0.0, max=300.0),
            ),
        ),
    )


def _random_long_frame(schema: CohortSchema, n: int, rng: np.random.Generator) -> pd.DataFrame:
    spec = schema.sequence
    assert spec is not None
    data: dict[str, Any] = {
        schema.id_column: np.repeat([f"X{i}" for i in range(n)], spec.length),
        spec.day_column: np.tile(np.arange(1, spec.length + 1), n),
    }
    for channel in spec.channels:
        data[channel.name] = rng.uniform(channel.min, channel.max, n * spec.length)
    return pd.DataFrame(data)


def _moments_gap(x: np.ndarray, moments: SequenceMoments) -> float:
    """The joint phase's moments loss of the weeks x against `moments`."""
    target = {key: torch.from_numpy(value) for key, value in moments.rhythm().items()}
    return float(_moments_loss(torch.from_numpy(x), target))
