"""The neural risk models (`hybrid-lstm`, `transformer`): one training loop, two networks.

Both routes share `fit`: a federated round trains on a hospital's members under DP-SGD (the
ledger pays); the synthetic route trains on the released synthetic cohort with `dp=None`
(post-processing of DP outputs, no epsilon).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.base import FitReport, LocalData, LocalRound, ModelKind
from models.encoder import TabularEncoder
from models.risk.features import (
    SUMMARIES_PER_CHANNEL,
    RiskInputs,
    balanced_weights,
    checked_weeks,
    prior_corrected,
    profile_features,
    targets,
    week_summaries,
)
from models.risk.networks import HybridLSTMNet, RiskTransformerNet
from models.runtime import autocast_for
from privacy.dp_training import DPSpec, dp_training
from privacy.facade import prepare_module

# The state entry holding the loss's class weights (identical at every hospital: from the DP shares).
CLASS_WEIGHTS = "class_weights"


class RiskConfig(BaseModel):
    """What both neural risk models share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_week: bool = True  # False: the profile-only variant (also what a schema without weeks gets)
    hidden_dim: int = Field(default=64, ge=4)
    # DP-SGD's noisy, clipped steps want a larger step size than plain training on synthetic rows.
    learning_rate: float = Field(default=1e-2, gt=0)  # federated DP rounds
    offline_learning_rate: float = Field(default=3e-3, gt=0)  # the synthetic route (and the ceiling)
    synthetic_epochs: int = Field(default=30, ge=1)  # the synthetic route's epochs (no privacy cost)
    synthetic_batch_size: int = Field(default=256, ge=8)


class NeuralRiskModel(RiskInputs):
    """A risk network over the encoded profile (label block removed) and, when used, the week."""

    kind: ClassVar[ModelKind] = ModelKind.RISK_MODEL
    releases: ClassVar[tuple[str, ...]] = ()
    phases: ClassVar[tuple[str, ...]] = ()
    registry_name: ClassVar[str]
    Config: ClassVar[type[RiskConfig]] = RiskConfig

    def __init__(self, encoder: TabularEncoder, config: RiskConfig | dict | None, *, seed: int = 0):
        self._read_inputs(encoder, config)
        # the loss's class weights, kept to map predictions back to the prevalence (prior_corrected)
        self.class_weights = np.ones(len(self.classes), dtype=np.float32)
        torch.manual_seed(seed)
        # nn.LSTM has no per-record gradients: prepare_module swaps it for Opacus's DPLSTM.
        self.network = prepare_module(
            self._build_network(
                encoder.width - len(self.classes) + SUMMARIES_PER_CHANNEL * self.n_channels * self.uses_week,
                self.n_channels,
                len(self.classes),
            )
        )

    def _build_network(self, profile_dim: int, n_channels: int, n_classes: int) -> nn.Module:
        raise NotImplementedError

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        return {**state, CLASS_WEIGHTS: torch.from_numpy(self.class_weights.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        network = {k: v for k, v in state.items() if k != CLASS_WEIGHTS}
        try:
            self.network.load_state_dict(network, strict=strict)
        except RuntimeError as err:  # missing, unexpected or misshapen entries
            raise KeyError(f"{self.registry_name} state does not fit its network: {err}") from None
        if CLASS_WEIGHTS in state:
            weights = state[CLASS_WEIGHTS].detach().cpu().numpy().astype(np.float32)
            if weights.shape != (len(self.classes),) or not np.all(weights > 0):
                raise KeyError(f"'{CLASS_WEIGHTS}' must hold {len(self.classes)} positive weights")
            self.class_weights = weights
        elif strict:
            raise KeyError(f"risk model state lacks '{CLASS_WEIGHTS}'")

    # ---------------------------------------------------------------- training
    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        """One federated round on the members under `plan.dp`, weighting classes by the DP label shares."""
        shares = self.encoder.marginal(self.encoder.schema.label_column)
        return self.fit(
            data,
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            dp=plan.dp,
            device=plan.device,
            seed=plan.seed,
            class_shares=shares,
            learning_rate=self.config.learning_rate,
            proximal_mu=plan.proximal_mu,
        )

    def fit_offline(self, data: LocalData, *, seed: int, device: torch.device) -> FitReport:
        """Training without DP: on released synthetic rows (post-processing, no epsilon) or, in simulation
        only, on the real demo cohort for the ceiling."""
        shares = np.bincount(targets(data.profiles, self.label), minlength=len(self.classes)) / len(
            data.profiles
        )
        return self.fit(
            data,
            epochs=self.config.synthetic_epochs,
            batch_size=self.config.synthetic_batch_size,
            dp=None,
            device=device,
            seed=seed,
            class_shares=shares,
            learning_rate=self.config.offline_learning_rate,
        )

    def fit(
        self,
        data: LocalData,
        *,
        epochs: int,
        batch_size: int,
        dp: DPSpec | None,
        device: torch.device,
        seed: int,
        class_shares: np.ndarray,
        learning_rate: float,
        proximal_mu: float = 0.0,
    ) -> FitReport:
        """Epochs of class-weighted cross-entropy (summed over the batch, as DP-SGD needs).

        Args:
            class_shares: the label's class shares the loss weights come from; under DP these
                must be public (the handshake's noisy histogram), never counted from the batch.
        """
        torch.manual_seed(seed)
        tensors = self._tensors(data, with_targets=True)
        loader = DataLoader(
            TensorDataset(*tensors),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        self.network.to(device).train()
        optimizer = torch.optim.Adam(self.network.parameters(), lr=learning_rate)
        self.class_weights = balanced_weights(class_shares)
        loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(self.class_weights).to(device), reduction="sum")
        report = FitReport()
        with dp_training(
            module=self.network,
            optimizer=optimizer,
            data_loader=loader,
            dp=dp,
            epochs=epochs,
            proximal_mu=proximal_mu,
        ) as session:
            for _ in range(epochs):
                for batch in session.data_loader:
                    *inputs, y = (t.to(device) for t in batch)
                    if len(y) == 0:  # Poisson sampling may draw an empty batch
                        continue
                    session.optimizer.zero_grad(set_to_none=True)
                    with autocast_for(device):
                        logits = session.module(*inputs)
                    loss_fn(logits.float(), y).backward()
                    session.optimizer.step()
                    report.steps += 1
        self.network = session.module.cpu()
        return report

    def _tensors(self, data: LocalData, *, with_targets: bool) -> list[torch.Tensor]:
        profile = profile_features(data.profiles, self.label)
        weeks = checked_weeks(data, self.uses_week, self.n_channels)
        if weeks is None:
            out = [torch.from_numpy(profile)]
        else:
            # The dense branch also reads each channel's weekly summaries: a spread over days
            # (irregular sleep) is one number here, where a small recurrent net learns it slowly.
            summaries = week_summaries(weeks, len(profile))
            out = [torch.from_numpy(np.concatenate([profile, summaries], axis=1)), torch.from_numpy(weeks)]
        if with_targets:
            out.append(torch.from_numpy(targets(data.profiles, self.label)))
        return out

    # ---------------------------------------------------------------- prediction
    def predict_proba(self, data: LocalData, *, batch_size: int = 2048) -> np.ndarray:
        """(rows, classes) probabilities at the training prevalence; the label block is ignored."""
        self.network.eval()
        tensors = self._tensors(data, with_targets=False)
        parts = []
        with torch.no_grad():
            for start in range(0, len(data.profiles), batch_size):
                logits = self.network(*(t[start : start + batch_size] for t in tensors))
                parts.append(torch.softmax(logits.float(), dim=1).numpy())
        if not parts:
            return np.zeros((0, len(self.classes)))
        return prior_corrected(np.concatenate(parts), self.class_weights)


class HybridLSTMConfig(RiskConfig):
    lstm_hidden_dim: int = Field(default=32, ge=2)


class HybridLSTM(NeuralRiskModel):
    """Dual branch: dense on the profile, bidirectional LSTM on the week, fused (`hybrid-lstm`)."""

    Config: ClassVar[type[RiskConfig]] = HybridLSTMConfig
    config: Any

    def _build_network(self, profile_dim: int, n_channels: int, n_classes: int) -> nn.Module:
        return HybridLSTMNet(
            profile_dim,
            n_channels,
            n_classes,
            hidden=self.config.hidden_dim,
            lstm_hidden=self.config.lstm_hidden_dim,
            use_week=self.uses_week,
        )


class TransformerConfig(RiskConfig):
    hidden_dim: int = Field(default=32, ge=4)  # the token width
    heads: int = Field(default=4, ge=1)
    layers: int = Field(default=2, ge=1, le=6)
    feedforward_dim: int = Field(default=64, ge=4)
    dropout: float = Field(default=0.1, ge=0, lt=1)


class RiskTransformer(NeuralRiskModel):
    """Day tokens and a profile token through a small attention encoder (`transformer`)."""

    Config: ClassVar[type[RiskConfig]] = TransformerConfig
    config: Any

    def _build_network(self, profile_dim: int, n_channels: int, n_classes: int) -> nn.Module:
        return RiskTransformerNet(
            profile_dim,
            n_channels,
            n_classes,
            width=self.config.hidden_dim,
            heads=self.config.heads,
            layers=self.config.layers,
            feedforward=self.config.feedforward_dim,
            dropout=self.config.dropout,
            use_week=self.uses_week,
        )
