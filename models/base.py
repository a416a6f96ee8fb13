"""The model contract: four kinds of model, what each is given and what each must answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel

from models.encoder import TabularEncoder
from privacy.dp_training import DPSpec


class ModelKind(StrEnum):
    """How a model learns, which fixes where it runs and how the plan treats its stage."""

    # Fitted on the server from the DP statistics the hospitals release; no training rounds.
    STATISTICS_GENERATOR = "statistics-generator"
    # Trained in rounds of DP-SGD at the hospitals, averaged on the server (static profiles).
    FEDERATED_GENERATOR = "federated-generator"
    # Weeks conditioned on the static profile, trained in rounds, possibly in phases.
    SEQUENCE_GENERATOR = "sequence-generator"
    # Predicts the schema's label column from the profile (and the week, when there is one).
    RISK_MODEL = "risk-model"


STATIC_GENERATOR_KINDS = (ModelKind.STATISTICS_GENERATOR, ModelKind.FEDERATED_GENERATOR)
ROUND_KINDS = (ModelKind.FEDERATED_GENERATOR, ModelKind.SEQUENCE_GENERATOR, ModelKind.RISK_MODEL)


@dataclass
class FitReport:
    """Mergeable sums and counts from one local fit (averages are derived, not sent)."""

    steps: int = 0
    records_seen: int = 0
    discriminator_loss_sum: float = 0.0
    generator_loss_sum: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        return {
            "steps": float(self.steps),
            "records-seen": float(self.records_seen),
            "discriminator-loss-sum": self.discriminator_loss_sum,
            "generator-loss-sum": self.generator_loss_sum,
            **self.extra,
        }


@dataclass(frozen=True)
class LocalData:
    """A hospital's members as a model sees them: encoded profiles, and weeks when the schema has them.

    `profiles` includes the label column's one-hot block (a risk model takes its target from it);
    `weeks` is (patients, days, channels) in [0, 1], rows aligned with `profiles`.
    """

    profiles: np.ndarray
    weeks: np.ndarray | None = None


@dataclass(frozen=True)
class LocalRound:
    """How one local round runs: epochs, batch size, DP, device, seed and the server's inputs.

    Args:
        dp: sigma, clipping norm and the ledger that pays; None trains without DP (tests only).
        proximal_mu: FedProx's weight of mu/2 ||w - w_global||^2 (0: plain local training).
        phase: the stage's phase for phased models ("" otherwise).
        statistics: merged DP releases the model declared it needs (`releases`), decoded;
            post-processing of DP outputs, so using them costs no epsilon.
        stand_ins: encoded profiles sampled from the trained static generator (sequence models).
    """

    epochs: int
    batch_size: int
    dp: DPSpec | None
    device: torch.device
    seed: int
    proximal_mu: float = 0.0
    phase: str = ""
    statistics: dict[str, Any] = field(default_factory=dict)
    stand_ins: np.ndarray | None = None


@runtime_checkable
class Model(Protocol):
    """What every registered model has: a name, a kind, a pydantic Config and state as named tensors.

    Constructed as `cls(encoder, config, *, seed=...)`; never pickled whole.
    """

    registry_name: ClassVar[str]
    kind: ClassVar[ModelKind]
    # Names of the DP releases (`models.releases.catalog`) the model needs from the handshake.
    releases: ClassVar[tuple[str, ...]]
    Config: ClassVar[type[BaseModel]]
    config: BaseModel
    encoder: TabularEncoder

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None: ...


@runtime_checkable
class RoundModel(Model, Protocol):
    """A model trained in federated rounds: one local round at a hospital returns a report."""

    # Phases run in this order, each its own stage of rounds; () for a single-phase model.
    phases: ClassVar[tuple[str, ...]]

    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport: ...


@runtime_checkable
class StatisticsGenerator(Model, Protocol):
    """Fitted on the server from merged DP statistics only; samples static profiles.

    Besides the handshake's releases it may ask the hospitals for noisy tables of column sets it
    chooses, in measurement rounds (`query.measure`): `measurement_weights` is the public split of
    its budget over the rounds (empty: none), `select_measurements` picks each round's column sets
    from DP outputs, `observe` takes the summed tables; then `fit_statistics`.
    """

    def measurement_weights(self) -> tuple[float, ...]: ...

    def select_measurements(self, round_index: int, statistics: dict[str, Any]) -> list[tuple[str, ...]]: ...

    def measurement_table_cells(self, round_index: int) -> int | None: ...

    def observe(self, tables: dict[str, np.ndarray], noise_sd: float) -> None: ...

    def fit_statistics(self, statistics: dict[str, Any]) -> None: ...

    def sampler_state_dict(self) -> dict[str, torch.Tensor]: ...

    def sample(self, n: int, *, seed: int) -> pd.DataFrame: ...


@runtime_checkable
class FederatedGenerator(RoundModel, Protocol):
    """Static profiles from a generator trained with DP-SGD at the hospitals."""

    def sampler_state_dict(self) -> dict[str, torch.Tensor]: ...

    def sample(self, n: int, *, seed: int) -> pd.DataFrame: ...


@runtime_checkable
class SequenceGenerator(RoundModel, Protocol):
    """Weeks for given static profiles, trained in (possibly phased) DP-SGD rounds."""

    def sampler_state_dict(self) -> dict[str, torch.Tensor]: ...

    def sample_encoded(self, cond: np.ndarray, *, seed: int) -> np.ndarray: ...

    def sample(self, static: pd.DataFrame | np.ndarray, *, seed: int) -> pd.DataFrame: ...


@runtime_checkable
class RiskModel(RoundModel, Protocol):
    """Class probabilities of the schema's label for encoded profiles (and weeks)."""

    def predict_proba(self, data: LocalData) -> np.ndarray: ...


KIND_PROTOCOLS: dict[ModelKind, type] = {
    ModelKind.STATISTICS_GENERATOR: StatisticsGenerator,
    ModelKind.FEDERATED_GENERATOR: FederatedGenerator,
    ModelKind.SEQUENCE_GENERATOR: SequenceGenerator,
    ModelKind.RISK_MODEL: RiskModel,
}


def contract_problems(model_class: type) -> list[str]:
    """What a model class lacks of its kind's contract (empty when it fulfils it)."""
    kind = getattr(model_class, "kind", None)
    if not isinstance(kind, ModelKind):
        return [f"'kind' must be a ModelKind, got {kind!r}"]
    protocol = KIND_PROTOCOLS[kind]
    wanted = {
        name
        for klass in protocol.__mro__
        if klass not in (Protocol, object, protocol.__mro__[-1])
        for name in getattr(klass, "__annotations__", {})
    } | {name for name in dir(protocol) if not name.startswith("_")}
    instance_only = {"config", "encoder"}
    return sorted(f"missing '{name}'" for name in wanted - instance_only if not hasattr(model_class, name))
