"""Pure client tasks: handshake statistics and one local DP training round."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from client.data import Cohort
from configs.schema import CohortSchema
from configs.settings import RunSettings
from models.ctgan_dp import DPSpec, FitReport
from models.encoder import EncoderError, TabularEncoder
from models.registry import get_model_class
from models.runtime import resolve_device
from models.statistics import Histograms, histogram_counts
from privacy.facade import release_noisy_histograms, steps_per_epoch
from privacy.ledger import PrivacyLedger

logger = logging.getLogger(__name__)


def handshake_statistics(
    cohort: Cohort,
    schema: CohortSchema,
    *,
    ledger: PrivacyLedger,
    epsilon: float,
    seed: int | None,
) -> Histograms:
    """DP-noised histograms of every static column on the schema's public bins."""
    return release_noisy_histograms(
        histogram_counts(cohort.static, schema),
        ledger=ledger,
        epsilon=epsilon,
        rng=np.random.default_rng(seed),
    )


@dataclass(frozen=True)
class TrainRequest:
    """What the server asks for one round (checked by the client before anything runs)."""

    model_name: str
    model_params: dict
    encoder_json: str
    encoder_hash: str
    server_round: int
    total_rounds: int
    local_epochs: int
    batch_size: int
    seed: int


def rebuild_encoder(request: TrainRequest, schema: CohortSchema) -> TabularEncoder:
    """The server's encoder, refused unless its hash matches what the server announced."""
    encoder = TabularEncoder.from_json(request.encoder_json, schema)
    if encoder.hash != request.encoder_hash:
        raise EncoderError(
            f"encoder hash mismatch: announced {request.encoder_hash[:12]}, got {encoder.hash[:12]}"
        )
    return encoder


def plan_noise_multiplier(ledger: PrivacyLedger, *, n_records: int, request: TrainRequest) -> float:
    """Sigma that spends what is left of the budget over every planned round of this model."""
    per_epoch = steps_per_epoch(n_records, request.batch_size)
    remaining_rounds = request.total_rounds - request.server_round + 1
    return ledger.calibrate_noise_multiplier(
        target_epsilon=ledger.max_epsilon,
        sample_rate=1.0 / per_epoch,
        steps=remaining_rounds * request.local_epochs * per_epoch,
    )


def train_round(
    cohort: Cohort,
    settings: RunSettings,
    request: TrainRequest,
    *,
    state: dict[str, torch.Tensor],
    ledger: PrivacyLedger,
    noise_multiplier: float,
    device: str,
    seed: int | None,
) -> tuple[dict[str, torch.Tensor], FitReport]:
    """Load the global weights, train locally with DP-SGD, return new weights + report."""
    schema = settings.load_schema()
    encoder = rebuild_encoder(request, schema)
    model = get_model_class(request.model_name)(encoder, request.model_params, seed=request.seed)
    model.load_state_dict(state)
    report = model.fit(
        encoder.transform(cohort.static),
        epochs=request.local_epochs,
        batch_size=request.batch_size,
        dp=DPSpec(
            noise_multiplier=noise_multiplier,
            clipping_norm=settings.privacy.clipping_norm,
            ledger=ledger,
            label=f"{request.model_name} round {request.server_round}",
        ),
        device=resolve_device(device),
        seed=seed if seed is not None else int(torch.seed() % 2**31),
    )
    return model.state_dict(), report
