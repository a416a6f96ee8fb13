"""The node's side of the privacy audit: its own synthetic sample, attack-score histograms, one
Gaussian release charged to its ledger (see `privacy.dp_audit`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from client.data import Cohort
from client.tasks import plan_target_epsilon, rebuild_encoder_from
from configs.schema import CohortSchema
from configs.wire import AuditRequest
from models.base import STATIC_GENERATOR_KINDS
from models.encoder import EncoderError, TabularEncoder
from models.registry import get_model_class
from privacy.dp_audit import AUDIT_ATTACKS, AUDIT_CHARGE, EDGES_SUFFIX, audit_histograms
from privacy.facade import release_noisy_histograms
from privacy.ledger import PrivacyLedger, rounds_noise


def _audited_model(
    request: AuditRequest, schema: CohortSchema, state: dict[str, torch.Tensor]
) -> tuple[Any, TabularEncoder]:
    """The generator the server sent, rebuilt here; refused unless it is a static generator."""
    encoder = rebuild_encoder_from(request.encoder_json, request.encoder_hash, schema)
    model_class = get_model_class(request.model)
    if model_class.kind not in STATIC_GENERATOR_KINDS:
        raise EncoderError(f"the audit needs a static generator; '{request.model}' is a {model_class.kind}")
    try:
        model = model_class(encoder, request.model_params, seed=0)
        model.load_state_dict(state, strict=False)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise EncoderError(f"the audit's {request.model} state does not load: {str(err)[:200]}") from None
    return model, encoder


def audit_release(
    members: Cohort,
    holdout: Cohort,
    schema: CohortSchema,
    request: AuditRequest,
    state: dict[str, torch.Tensor],
    *,
    ledger: PrivacyLedger,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """Noisy attack-score histograms (and their public edges) and the noise sd per count.

    Args:
        seed: the node's own randomness for the noise; a deployed node draws it fresh
            (`client.node.fresh_noise_seed`), so nobody can regenerate it.
    """
    if members.n_patients < 2 or holdout.n_patients < 2:
        raise EncoderError("the audit needs at least 2 members and 2 held-out patients")
    model, encoder = _audited_model(request, schema, state)
    drawn = encoder.transform(model.sample(2 * request.rows, seed=request.sample_seed)).astype(np.float64)
    synthetic, reference = drawn[: request.rows], drawn[request.rows :]
    counts, edges = audit_histograms(
        encoder.transform(members.static).astype(np.float64),
        encoder.transform(holdout.static).astype(np.float64),
        synthetic,
        reference,
    )
    # One Gaussian release for every attack's histograms: the audit's share of what is left.
    target = plan_target_epsilon(ledger, request)
    rho = ledger.calibrate_gaussian_rounds(target_epsilon=target, weights=[1.0])
    z = rounds_noise(rho, 1.0)
    noisy = release_noisy_histograms(
        counts, ledger=ledger, rng=np.random.default_rng([1, seed]), noise_multiplier=z, what=AUDIT_CHARGE
    )
    arrays = {name: noisy[name] for name in AUDIT_ATTACKS}
    arrays |= {name + EDGES_SUFFIX: edges[name] for name in AUDIT_ATTACKS}
    # release_noisy_histograms' sensitivity: one count per attack, sqrt(attacks) in all
    return arrays, z * math.sqrt(len(counts))
