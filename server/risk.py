"""Risk models after the release: the synthetic route trained here, both routes bundled with their route."""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd

from configs.settings import RunSettings
from models.encoder import TabularEncoder
from models.risk.features import encode_patients
from models.runtime import resolve_device
from server.export import FEDERATED_ROUTE, SYNTHETIC_ROUTE, TrainedRisk
from server.plan import build_model

logger = logging.getLogger(__name__)


def federated_risk(models: list[Any]) -> list[TrainedRisk]:
    """The plan's risk stages, trained at the hospitals under DP-SGD (their ledgers paid)."""
    return [TrainedRisk(m, FEDERATED_ROUTE) for m in models]


def train_on_synthetic(
    settings: RunSettings, encoder: TabularEncoder, synthetic: pd.DataFrame, timeseries: pd.DataFrame | None
) -> list[TrainedRisk]:
    """Each `[risk] synthetic_models` model trained on the released synthetic cohort.

    The rows are samples of DP-trained generators, so this is post-processing: no hospital's
    ledger is charged and the card says epsilon 0 for the training itself.
    """
    if not settings.risk.synthetic_models:
        return []
    data = encode_patients(encoder, synthetic, timeseries)
    device = resolve_device(settings.runtime.device)
    trained = []
    without_weeks = timeseries is None and encoder.schema.sequence is not None
    for name in settings.risk.synthetic_models:
        started = time.perf_counter()
        model = build_model(name, encoder, settings)
        if without_weeks and model.uses_week:  # the plan has no sequence generator: no synthetic weeks
            logger.info(
                "risk model %s: no synthetic weeks were released, training its profile-only variant", name
            )
            model = type(model)(
                encoder, model.config.model_copy(update={"use_week": False}), seed=settings.federation.seed
            )
        model.fit_offline(data, seed=settings.federation.seed, device=device)
        seconds = time.perf_counter() - started
        logger.info("risk model %s trained on %d synthetic patients in %.1f s", name, len(synthetic), seconds)
        card = {"training_epsilon": 0.0, "trained_on_rows": len(synthetic)}
        trained.append(TrainedRisk(model, SYNTHETIC_ROUTE, seconds, card))
    return trained
