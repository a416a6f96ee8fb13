"""The node's side of the risk models' evaluation: every model the server sends scores the node's
held-out patients; one Gaussian release of the count tables, charged to its ledger."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from client.data import Cohort
from client.tasks import plan_target_epsilon, rebuild_encoder_from
from configs.schema import CohortSchema
from configs.wire import EvaluateRequest
from models.base import ModelKind
from models.encoder import EncoderError, TabularEncoder
from models.registry import get_model_class
from models.risk.dp_scores import evaluation_tables
from models.risk.features import encode_patients, label_slice
from privacy.facade import release_noisy_histograms
from privacy.ledger import PrivacyLedger, rounds_noise

EVALUATION_CHARGE = "risk evaluation"  # the ledger entry's label
MIN_HELD_OUT = 2


def _risk_model(
    name: str, params: dict[str, Any], encoder: TabularEncoder, state: dict[str, torch.Tensor]
) -> Any:
    """The model the server sent, rebuilt here; refused unless it is a risk model whose state loads."""
    model_class = get_model_class(name)
    if model_class.kind != ModelKind.RISK_MODEL:
        raise EncoderError(f"the evaluation needs risk models; '{name}' is a {model_class.kind}")
    try:
        model = model_class(encoder, params, seed=0)
        model.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise EncoderError(f"the evaluation's {name} state does not load: {str(err)[:200]}") from None
    return model


def evaluation_release(
    holdout: Cohort,
    schema: CohortSchema,
    request: EvaluateRequest,
    states: dict[str, dict[str, torch.Tensor]],
    *,
    ledger: PrivacyLedger,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """Noisy tables `"<folder>.<table>"` of every model on the held-out patients, and the noise sd.

    Args:
        states: folder -> the model's state, one per entry of `request.models`.
        seed: the node's own randomness for the noise (fresh on a deployed node).
    """
    if holdout.n_patients < MIN_HELD_OUT:
        raise EncoderError(f"the evaluation needs at least {MIN_HELD_OUT} held-out patients")
    missing = sorted(set(request.models) - set(states))
    if missing:
        raise EncoderError(f"the evaluation request lacks the state of {missing}")
    encoder = rebuild_encoder_from(request.encoder_json, request.encoder_hash, schema)
    data = encode_patients(encoder, holdout.static, holdout.timeseries)
    truth = data.profiles[:, label_slice(encoder)].argmax(axis=1)
    n_classes = label_slice(encoder).stop - label_slice(encoder).start
    counts: dict[str, np.ndarray] = {}
    for folder, (name, params) in sorted(request.models.items()):
        model = _risk_model(name, params, encoder, states[folder])
        probabilities = model.predict_proba(data)
        for table, values in evaluation_tables(probabilities, truth, n_classes).items():
            counts[f"{folder}.{table}"] = values
    # One Gaussian release of every table: each patient is one count in each, sqrt(tables) in all.
    target = plan_target_epsilon(ledger, request)
    rho = ledger.calibrate_gaussian_rounds(target_epsilon=target, weights=[1.0])
    z = rounds_noise(rho, 1.0)
    noisy = release_noisy_histograms(
        counts,
        ledger=ledger,
        rng=np.random.default_rng([3, seed]),
        noise_multiplier=z,
        what=EVALUATION_CHARGE,
    )
    return noisy, z * math.sqrt(len(counts))
