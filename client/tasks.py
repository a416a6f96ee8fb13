"""Pure client tasks: handshake statistics and one local DP training round."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from client.data import Cohort
from configs.schema import CohortSchema
from configs.settings import RunSettings
from models.ctgan_dp import DPSpec, FitReport
from models.encoder import EncoderError, TabularEncoder
from models.numeric_moments import release_numeric_products
from models.pairs import pair_counts
from models.registry import get_model_class
from models.runtime import resolve_device
from models.sequence_metrics import evaluate_sequences
from models.statistics import Histograms, histogram_counts
from models.timegan import (
    MOMENT_BLOCKS,
    SequenceEncoder,
    SequenceMoments,
    decode_stand_ins,
    release_noisy_moments,
)
from privacy.attacks import classifier_attack, dcr_overfitting_protection, distance_attack, domias_attack
from privacy.facade import gaussian_noise_multiplier, release_noisy_histograms, steps_per_epoch
from privacy.ledger import PrivacyLedger

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandshakeStatistics:
    histograms: Histograms
    pairs: Histograms
    numeric: np.ndarray  # sums of a a^T, a = (numeric columns, 1): `models.numeric_moments`
    moments: SequenceMoments | None


def handshake_statistics(
    cohort: Cohort,
    schema: CohortSchema,
    *,
    ledger: PrivacyLedger,
    epsilon: float,
    seed: int | None,
    with_moments: bool,
) -> HandshakeStatistics:
    """DP histograms of every column and column pair, the numeric columns' second moments
    (+ DP sequence moments), `epsilon` in all.

    k Gaussian releases with noise multiplier z * sqrt(k) cost, under RDP, exactly what one
    release with z costs, so the statistics' share of the budget is split evenly between them.
    The sequence moments are one release per block (`models.timegan.MOMENT_BLOCKS`).
    """
    releases = 3 + (len(MOMENT_BLOCKS) if with_moments else 0)
    z = gaussian_noise_multiplier(epsilon=epsilon, delta=ledger.delta) * math.sqrt(releases)
    ledger.check("handshake statistics", noise_multiplier=z, sample_rate=1.0, steps=releases)
    rng = np.random.default_rng(seed)
    histograms = release_noisy_histograms(
        histogram_counts(cohort.static, schema), ledger=ledger, rng=rng, noise_multiplier=z
    )
    pairs = release_noisy_histograms(
        pair_counts(cohort.static, schema), ledger=ledger, rng=rng, noise_multiplier=z
    )
    numeric = release_numeric_products(
        cohort.static, schema, histograms, ledger=ledger, noise_multiplier=z, rng=rng
    )
    moments = None
    if with_moments:
        sequence = SequenceEncoder.from_schema(schema)
        moments = release_noisy_moments(
            weeks_of(cohort, schema),
            ledger=ledger,
            noise_multiplier=z,
            rng=rng,
            what="handshake sequence moments",
            day_sd=sequence.day_sd,
            week_sd=sequence.week_sd,
        )
    return HandshakeStatistics(histograms, pairs, numeric, moments)


def _pair_targets(text: str) -> dict[str, float] | None:
    """The server's pair correlations, refused unless a JSON object of numbers."""
    if not text:
        return None
    try:
        targets = json.loads(text)
    except json.JSONDecodeError as err:
        raise EncoderError(f"pair correlations are not valid JSON: {err}") from None
    if not isinstance(targets, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in targets.values()
    ):
        raise EncoderError("pair correlations must be a JSON object of numbers")
    return {str(k): float(v) for k, v in targets.items()}


def weeks_of(cohort: Cohort, schema: CohortSchema) -> np.ndarray:
    """The cohort's weeks as (patients, days, channels) in [0, 1], rows aligned with `static`."""
    if cohort.timeseries is None:
        raise EncoderError("the schema declares no sequence, but a sequence model was asked for")
    return SequenceEncoder.from_schema(schema).transform(cohort.timeseries, cohort.static[schema.id_column])


@dataclass(frozen=True)
class TrainRequest:
    """What the server asks for one round (checked by the client before anything runs)."""

    model_name: str
    model_params: dict
    encoder_json: str
    encoder_hash: str
    server_round: int
    rounds_remaining: int  # of this model, this round included: what the noise is planned over
    budget_share: float  # share of the hospital's remaining epsilon this model may spend
    local_epochs: int
    batch_size: int
    seed: int
    phase: str = ""  # TimeGAN phase; "" for a static-table model
    lr_multiplier: float = 1.0  # SA-DQC's learning-rate adjustment after a rollback
    moments_json: str = ""  # merged DP sequence moments for TimeGAN's moments loss
    # .npy bytes of encoded profiles sampled from the DP static generator (TimeGAN's joint phase)
    stand_ins_npy: bytes = b""
    # {"a|b": r} of numeric column pairs from the merged DP numeric moments (the static generator)
    pair_targets_json: str = ""


def rebuild_encoder(request: TrainRequest, schema: CohortSchema) -> TabularEncoder:
    return rebuild_encoder_from(request.encoder_json, request.encoder_hash, schema)


def rebuild_encoder_from(encoder_json: str, announced_hash: str, schema: CohortSchema) -> TabularEncoder:
    """The server's encoder, refused unless its hash matches what the server announced."""
    encoder = TabularEncoder.from_json(encoder_json, schema)
    if encoder.hash != announced_hash:
        raise EncoderError(f"encoder hash mismatch: announced {announced_hash[:12]}, got {encoder.hash[:12]}")
    return encoder


def plan_target_epsilon(ledger: PrivacyLedger, request: TrainRequest) -> float:
    """Cumulative epsilon this model may bring the ledger to: its share of what is left now.

    Never above the hospital's own max epsilon; fixed at the model's first round and kept
    (with the node's state) so a resumed run spreads the same target over the rounds left.
    """
    spent = ledger.spent()
    return spent + min(1.0, request.budget_share) * (ledger.max_epsilon - spent)


def plan_noise_multiplier(
    ledger: PrivacyLedger, *, n_records: int, request: TrainRequest, target_epsilon: float | None = None
) -> float:
    """Sigma that lets this model's remaining rounds bring the ledger to `target_epsilon` at most.

    The target is cumulative (the ledger composes it with every earlier charge); by default it
    is `plan_target_epsilon`.
    """
    per_epoch = steps_per_epoch(n_records, request.batch_size)
    target = plan_target_epsilon(ledger, request) if target_epsilon is None else target_epsilon
    return ledger.calibrate_noise_multiplier(
        target_epsilon=target,
        sample_rate=1.0 / per_epoch,
        steps=request.rounds_remaining * request.local_epochs * per_epoch,
    )


def fits_target(
    ledger: PrivacyLedger, *, n_records: int, request: TrainRequest, sigma: float, target: float
) -> bool:
    """Do the remaining rounds at `sigma` stay within `target`? False after a round was redone."""
    per_epoch = steps_per_epoch(n_records, request.batch_size)
    after = ledger.epsilon_if(
        noise_multiplier=sigma,
        sample_rate=1.0 / per_epoch,
        steps=request.rounds_remaining * request.local_epochs * per_epoch,
    )
    return after <= target * (1 + 1e-9)


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
    params = {
        key: value * request.lr_multiplier
        if (key.endswith("_lr") or key == "learning_rate") and isinstance(value, int | float)
        else value
        for key, value in request.model_params.items()
    }
    model = get_model_class(request.model_name)(encoder, params, seed=request.seed)
    model.load_state_dict(state)
    dp = DPSpec(
        noise_multiplier=noise_multiplier,
        clipping_norm=settings.privacy.clipping_norm,
        ledger=ledger,
        label=f"{request.model_name} {request.phase} round {request.server_round}".replace("  ", " "),
    )
    common = {
        "epochs": request.local_epochs,
        "batch_size": request.batch_size,
        "dp": dp,
        "device": resolve_device(device),
        "seed": seed if seed is not None else int(torch.seed() % 2**31),
    }
    profiles = encoder.transform(cohort.static)
    if getattr(model, "kind", "table") == "sequence":
        moments = SequenceMoments.from_json(request.moments_json) if request.moments_json else None
        stand_ins = decode_stand_ins(request.stand_ins_npy, encoder.width) if request.stand_ins_npy else None
        report = model.fit(
            weeks_of(cohort, schema),
            profiles,
            phase=request.phase,
            moments=moments,
            stand_ins=stand_ins,
            **common,
        )
    else:
        pair_targets = _pair_targets(request.pair_targets_json)
        report = model.fit(profiles, pair_targets=pair_targets, **common)
    return model.state_dict(), report


def audit_answers(
    members: Cohort,
    holdout: Cohort,
    synthetic: np.ndarray,
    encoder: TabularEncoder,
    *,
    n_bootstrap: int,
    seed: int,
) -> dict[str, float | list[float]]:
    """DCR and membership-inference attacks on this hospital's own members vs non-members.

    Only aggregates leave: scores, counts, histogram counts on fixed bins and ROC curves on a
    fixed FPR grid; never a record or a per-record score. For the attacks that need a population
    reference, the held-out records are split in two: candidates (non-members) and reference.
    """
    train = encoder.transform(members.static)
    held = encoder.transform(holdout.static)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(held))
    candidates, reference = held[order[: len(held) // 2]], held[order[len(held) // 2 :]]
    answers: dict[str, float | list[float]] = {}
    dcr = dcr_overfitting_protection(train, held, synthetic, seed=seed)
    for key, value in asdict(dcr).items():
        answers[f"dcr/{key}"] = list(map(float, value)) if isinstance(value, tuple) else float(value)
    attacks = [
        # needs no population reference, so every held-out record serves as a non-member
        distance_attack(train, held, synthetic, seed=seed, n_bootstrap=n_bootstrap),
        domias_attack(train, candidates, synthetic, reference, seed=seed, n_bootstrap=n_bootstrap),
        classifier_attack(train, candidates, synthetic, reference, seed=seed, n_bootstrap=n_bootstrap),
    ]
    for attack in attacks:
        for key, value in asdict(attack).items():
            if key == "name":
                continue
            answers[f"attack/{attack.name}/{key}"] = (
                list(map(float, value)) if isinstance(value, tuple) else float(value)
            )
    return answers


def sequence_answers(
    members: Cohort, weeks: np.ndarray, synthetic: np.ndarray, encoder: TabularEncoder, *, seed: int
) -> dict[str, float]:
    """TimeGAN fidelity of the synthetic weeks against this hospital's real weeks (aggregates only)."""
    schema = encoder.schema
    assert schema.sequence is not None
    metrics = evaluate_sequences(
        weeks_of(members, schema),
        weeks,
        channels=[c.name for c in schema.sequence.channels],
        seed=seed,
        real_static=members.static,
        syn_static=encoder.inverse_transform(synthetic),
    )
    return {f"sequence/{key}": float(value) for key, value in metrics.items()}
