"""Pure client tasks: handshake statistics, one local DP training round, measurement rounds."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from client.data import Cohort
from client.node import fresh_noise_seed
from configs.schema import CohortSchema
from configs.settings import RunSettings
from configs.wire import AuditRequest, EvaluateRequest, MeasureRequest, TrainRequest
from models.base import FitReport, LocalData, LocalRound, ModelKind
from models.encoder import EncoderError, TabularEncoder
from models.pgm.domain import to_cells
from models.pgm.marginals import Clique, clique_of, release_marginals
from models.registry import get_model_class
from models.releases.base import Members, decode_arrays
from models.releases.catalog import get_release, releases_for
from models.runtime import resolve_device
from models.sequence.encoder import SequenceEncoder
from models.sequence.stand_ins import decode_stand_ins
from privacy.dp_training import DPSpec
from privacy.facade import gaussian_noise_multiplier, planned_steps
from privacy.ledger import PrivacyLedger, rounds_noise

logger = logging.getLogger(__name__)

# Kinds whose local rounds see the members' weeks (when the schema has a sequence).
WEEK_KINDS = (ModelKind.SEQUENCE_GENERATOR, ModelKind.RISK_MODEL)


def handshake_statistics(
    cohort: Cohort,
    schema: CohortSchema,
    *,
    ledger: PrivacyLedger,
    epsilon: float,
    seed: int | None,
    releases: list[str],
) -> dict[str, Any]:
    """The DP releases named (and those always made), `epsilon` in all: release name -> statistic.

    k Gaussian releases with noise multiplier z * sqrt(k) cost, under RDP, exactly what one
    release with z costs, so the statistics' share of the budget is split evenly between them
    (the sequence moments count as one release per block).
    """
    chosen = releases_for(releases)
    count = sum(release.gaussian_releases(schema) for release in chosen)
    z = gaussian_noise_multiplier(epsilon=epsilon, delta=ledger.delta) * math.sqrt(count)
    ledger.check("handshake statistics", noise_multiplier=z, sample_rate=1.0, steps=count)
    rng = np.random.default_rng(seed)
    weeks = weeks_of(cohort, schema) if cohort.timeseries is not None else None
    members = Members(cohort.static, weeks)
    released: dict[str, Any] = {}
    for release in chosen:
        released[release.name] = release.measure(
            members, schema, ledger=ledger, noise_multiplier=z, rng=rng, released=released
        )
    return released


def weeks_of(cohort: Cohort, schema: CohortSchema) -> np.ndarray:
    """The cohort's weeks as (patients, days, channels) in [0, 1], rows aligned with `static`."""
    if cohort.timeseries is None:
        raise EncoderError("the schema declares no sequence, but a sequence model was asked for")
    return SequenceEncoder.from_schema(schema).transform(cohort.timeseries, cohort.static[schema.id_column])


def rebuild_encoder(request: TrainRequest, schema: CohortSchema) -> TabularEncoder:
    return rebuild_encoder_from(request.encoder_json, request.encoder_hash, schema)


def rebuild_encoder_from(encoder_json: str, announced_hash: str, schema: CohortSchema) -> TabularEncoder:
    """The server's encoder, refused unless its hash matches what the server announced."""
    encoder = TabularEncoder.from_json(encoder_json, schema)
    if encoder.hash != announced_hash:
        raise EncoderError(f"encoder hash mismatch: announced {announced_hash[:12]}, got {encoder.hash[:12]}")
    return encoder


def plan_target_epsilon(
    ledger: PrivacyLedger, request: TrainRequest | MeasureRequest | AuditRequest | EvaluateRequest
) -> float:
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
    sample_rate, per_epoch = planned_steps(n_records, request.batch_size)
    target = plan_target_epsilon(ledger, request) if target_epsilon is None else target_epsilon
    return ledger.calibrate_noise_multiplier(
        target_epsilon=target,
        sample_rate=sample_rate,
        steps=request.rounds_remaining * request.local_epochs * per_epoch,
    )


def fits_target(
    ledger: PrivacyLedger, *, n_records: int, request: TrainRequest, sigma: float, target: float
) -> bool:
    """Do the remaining rounds at `sigma` stay within `target`? False after a round was redone."""
    sample_rate, per_epoch = planned_steps(n_records, request.batch_size)
    after = ledger.epsilon_if(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=request.rounds_remaining * request.local_epochs * per_epoch,
    )
    return after <= target * (1 + 1e-9)


def _scaled_learning_rates(params: dict[str, Any], multiplier: float) -> dict[str, Any]:
    """SA-DQC's learning-rate multiplier on every `*_lr` / `learning_rate` parameter."""
    return {
        key: value * multiplier
        if (key.endswith("_lr") or key == "learning_rate") and isinstance(value, int | float)
        else value
        for key, value in params.items()
    }


def local_data(cohort: Cohort, encoder: TabularEncoder, *, with_weeks: bool) -> LocalData:
    """The members as models see them: encoded profiles, and their weeks when asked for."""
    weeks = weeks_of(cohort, encoder.schema) if with_weeks else None
    return LocalData(profiles=encoder.transform(cohort.static), weeks=weeks)


def _decoded_statistics(request: TrainRequest, schema: CohortSchema) -> dict[str, Any]:
    """The merged DP statistics the server sent, checked like a hospital's own reply would be."""
    try:
        return {
            name: get_release(name).from_arrays(decode_arrays(data), schema)
            for name, data in request.statistics.items()
        }
    except ValueError as err:
        raise EncoderError(f"the server's statistics are unusable: {err}") from None


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
    """Load the global weights, run one local round of the model's `fit_round`, return weights + report."""
    schema = settings.load_schema()
    encoder = rebuild_encoder(request, schema)
    model_class = get_model_class(request.model)
    model = model_class(
        encoder, _scaled_learning_rates(request.model_params, request.lr_multiplier), seed=request.seed
    )
    model.load_state_dict(state)
    dp = DPSpec(
        noise_multiplier=noise_multiplier,
        clipping_norm=settings.privacy.clipping_norm,
        ledger=ledger,
        label=f"{request.model} {request.phase} round {request.server_round}".replace("  ", " "),
    )
    plan = LocalRound(
        epochs=request.local_epochs,
        batch_size=request.batch_size,
        dp=dp,
        device=resolve_device(device),
        seed=seed if seed is not None else fresh_noise_seed(),
        proximal_mu=request.proximal_mu,
        phase=request.phase,
        statistics=_decoded_statistics(request, schema),
        stand_ins=decode_stand_ins(request.stand_ins, encoder.width) if request.stand_ins else None,
    )
    with_weeks = model_class.kind in WEEK_KINDS and schema.sequence is not None
    report = model.fit_round(local_data(cohort, encoder, with_weeks=with_weeks), plan)
    return _without_step_counters(model.state_dict(), state), report


def _without_step_counters(
    new: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The weights with BatchNorm's batch counters as the server sent them.

    The counter counts local steps, a function of the number of patients; with a momentum set
    (as every model here has) BatchNorm never reads it, so the node returns what it received.
    """
    return {
        k: sent[k].clone() if k.endswith("num_batches_tracked") and k in sent else v for k, v in new.items()
    }


def measurement_plan(
    ledger: PrivacyLedger, request: MeasureRequest, plan: dict[str, Any] | None
) -> dict[str, Any]:
    """The model's measurement plan with this round marked done; refused if the round breaks it.

    Made at the model's first round request: the target is its share of what is left then
    (`plan_target_epsilon`), rho is split over the rounds by the request's public weights, so
    every round's noise is known up front. Later requests must carry the same weights and a round
    not measured yet: a server that changed the split or asked for a round twice could otherwise
    spend more of this hospital's budget than the model's share (the plan is pinned here).
    """
    if plan is None:
        target = plan_target_epsilon(ledger, request)
        plan = {
            "target": target,
            "rho": ledger.calibrate_gaussian_rounds(target_epsilon=target, weights=request.weights),
            "weights": list(request.weights),
            "done": [],
        }
    elif plan.get("weights") != list(request.weights):
        raise EncoderError(f"{request.model}: the measurement rounds' weights differ from the plan's")
    if request.round_index in plan["done"]:
        raise EncoderError(f"{request.model}: measurement round {request.round_index} was measured already")
    return {**plan, "done": [*plan["done"], request.round_index]}


def _checked_cliques(request: MeasureRequest, schema: CohortSchema) -> list[Clique]:
    """The requested column sets, refused unless each names 1-3 distinct schema columns."""
    cliques = []
    for key in request.cliques:
        clique = clique_of(key)
        unknown = [name for name in clique if name not in schema.column_names]
        if unknown or len(set(clique)) != len(clique) or not 1 <= len(clique) <= 3:
            raise EncoderError(f"measurement '{key}' is not 1-3 distinct columns of the schema")
        if clique in cliques:  # the noise is sized on the tables sent: each once
            raise EncoderError(f"measurement '{key}' is asked for twice")
        cliques.append(clique)
    if not cliques:
        raise EncoderError("a measurement round names no column sets")
    return cliques


def measure_round(
    cohort: Cohort,
    schema: CohortSchema,
    request: MeasureRequest,
    *,
    ledger: PrivacyLedger,
    rho: float,
    seed: int | None,
) -> tuple[dict[str, np.ndarray], float]:
    """Noisy tables of the requested column sets (one Gaussian release, charged); returns them and
    the noise multiplier used (a public function of the declared budget, for the server's estimate)."""
    cliques = _checked_cliques(request, schema)
    z = rounds_noise(rho, request.weights[request.round_index - 1])
    tables = release_marginals(
        to_cells(cohort.static, schema),
        schema,
        cliques,
        ledger=ledger,
        noise_multiplier=z,
        rng=np.random.default_rng(seed),
        what=f"{request.model} measurement round {request.round_index}",
        table_cells=request.table_cells,
    )
    return tables, z
