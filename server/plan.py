"""The run plan made concrete: one Stage per (model, phase), with its config, score and budget."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from configs.plan import StageSpec
from configs.settings import RunSettings
from configs.wire import TrainRequest
from models.base import STATIC_GENERATOR_KINDS, ModelKind
from models.encoder import TabularEncoder
from models.registry import get_model_class
from models.releases.base import encode_arrays
from models.releases.catalog import get_release
from models.releases.sequence import SEQUENCE_MOMENTS
from models.sequence.moments import SequenceMoments
from models.sequence.stand_ins import encode_stand_ins
from server.handshake import HandshakeResult
from server.sadqc import SADQC, QualityScores, SADQCConfig, score_sample

# The ClientApp's train handler for each kind of round model (`train.<action>`).
ACTIONS = {
    ModelKind.FEDERATED_GENERATOR: "generator",
    ModelKind.SEQUENCE_GENERATOR: "sequence",
    ModelKind.RISK_MODEL: "risk",
}


@dataclass
class Stage:
    """A run of federated rounds for one model (and one phase); a statistics generator's has none."""

    model: Any
    spec: StageSpec
    rounds: int
    label: str
    phase: str = ""
    rounds_before: int = 0  # rounds of this model in earlier phases
    budget_share: float = 1.0  # share of each hospital's epsilon left at the model's start
    # server-side quality after a round (DP references only); stages with a controller use `quality`
    score: Callable[[int], float] | None = None
    quality: Callable[[int], QualityScores] | None = None
    controller: SADQC | None = None
    # Made when the stage starts, from what earlier stages trained (post-processing only).
    late_config: Callable[[], dict[str, Any]] | None = None

    @property
    def action(self) -> str:
        return ACTIONS[self.model.kind]

    @property
    def name(self) -> str:
        return str(self.model.registry_name)


def build_model(name: str, encoder: TabularEncoder, settings: RunSettings) -> Any:
    """A registered model with its `[model.<name>]` parameters and the run's seed."""
    model_class = get_model_class(name)
    params = model_class.Config(**settings.model.params_for(name))
    return model_class(encoder, params, seed=settings.federation.seed)


def plan_releases(settings: RunSettings) -> list[str]:
    """Every DP release the plan's models declared (the handshake adds those always made)."""
    names: list[str] = []
    for stage in settings.stages:
        names += [n for n in get_model_class(stage.model).releases if n not in names]
    return names


def budget_shares(settings: RunSettings) -> list[float]:
    """Each stage's share of the epsilon a hospital has left when the stage starts.

    The plan declares shares of max epsilon; a hospital plans each model's noise at its first
    round from what is left then, so stage i asks for s_i / (1 - handshake - earlier shares).
    """
    left = 1.0 - settings.privacy.statistics_epsilon_share
    shares = []
    for stage in settings.stages:
        shares.append(min(1.0, stage.epsilon_share / left) if left > 0 else 0.0)
        left -= stage.epsilon_share
    return shares


def audit_budget_share(settings: RunSettings) -> float:
    """The audit's share of the epsilon a hospital has left when it comes: its declared share of
    max epsilon over what the plan leaves after the handshake and every stage."""
    left = 1.0 - settings.privacy.statistics_epsilon_share - sum(s.epsilon_share for s in settings.stages)
    return min(1.0, settings.audit.epsilon_share / max(left, settings.audit.epsilon_share))


def evaluation_budget_share(settings: RunSettings) -> float:
    """The risk evaluation's share of what a hospital has left after the audit (it comes last)."""
    share = settings.risk_evaluation_share
    left = 1.0 - settings.privacy.statistics_epsilon_share - settings.audit.epsilon_share
    left -= sum(s.epsilon_share for s in settings.stages)
    return min(1.0, share / max(left, share)) if share > 0 else 0.0


def stage_request(
    stage: Stage, encoder: TabularEncoder, settings: RunSettings, federation_id: str
) -> ConfigRecord:
    """The typed train request a stage's rounds send (the strategy adds the round number)."""
    fed = settings.federation
    request = TrainRequest(
        model=stage.name,
        model_params=stage.model.config.model_dump(mode="json"),
        encoder_json=encoder.to_json(),
        encoder_hash=encoder.hash,
        phase=stage.phase,
        model_rounds=stage.spec.total_rounds,
        rounds_before=stage.rounds_before,
        budget_share=stage.budget_share,
        local_epochs=fed.local_epochs,
        batch_size=fed.batch_size,
        seed=fed.seed,
        federation_id=federation_id,
        **(stage.late_config() if stage.late_config is not None else {}),
    )
    return request.to_config()


def table_quality(
    model: Any, handshake: HandshakeResult, settings: RunSettings
) -> Callable[[int], QualityScores]:
    """SA-DQC scores of a synthetic sample vs the DP histograms and DP pair tables."""

    def quality(server_round: int) -> QualityScores:
        sample = model.sample(settings.export.round_sample_rows, seed=settings.federation.seed + server_round)
        return score_sample(sample, handshake.reference, handshake.reference_pairs, model.encoder.schema)

    return quality


def sequence_scorer(
    model: Any, profiles: Callable[[], np.ndarray], reference: SequenceMoments
) -> Callable[[int], float]:
    """1 - mean |gap| of per-(day, channel) means and stds vs the DP sequence moments ([0, 1] scale)."""
    ref_mean, ref_std = reference.mean_std()

    def score(server_round: int) -> float:
        weeks = model.sample_encoded(profiles(), seed=server_round)
        mean, std = SequenceMoments.of(weeks).mean_std()
        return float(1.0 - np.abs(mean - ref_mean).mean() - np.abs(std - ref_std).mean())

    return score


def _no_score(server_round: int) -> float:
    """Stages without a server-side score of their own (e.g. risk models) log NaN."""
    return float("nan")


def _encoded_statistics(model_class: type, handshake: HandshakeResult) -> dict[str, bytes]:
    """The merged DP releases a model declared, as the wire carries them."""
    return {
        name: encode_arrays(get_release(name).to_arrays(handshake.statistics[name]))
        for name in model_class.releases
    }


@dataclass
class _Context:
    settings: RunSettings
    encoder: TabularEncoder
    handshake: HandshakeResult
    table: Any = None  # the static generator, once built


def _static_stages(spec: StageSpec, model: Any, share: float, ctx: _Context) -> list[Stage]:
    """A statistics generator is fitted on the server; a federated one trains under SA-DQC, one
    stage per phase; a refiner of a coarse model (hhg) gets the generator before it attached."""
    if model.kind == ModelKind.STATISTICS_GENERATOR:  # measured and fitted on the server, no rounds
        return [Stage(model, spec, 0, model.registry_name, budget_share=share)]
    coarse = ctx.table if getattr(model, "refines_coarse", False) else None
    if coarse is not None:
        model.attach_coarse(coarse)
    controller = SADQC(
        SADQCConfig(**ctx.settings.sadqc.model_dump(exclude={"contamination"})), stage=model.registry_name
    )
    wire_statistics = _encoded_statistics(type(model), ctx.handshake)
    settings = ctx.settings

    @functools.cache
    def stand_ins() -> bytes:  # samples of the coarse DP model: post-processing, no record in them
        rows = coarse.sample(settings.export.round_sample_rows, seed=settings.federation.seed)
        return encode_stand_ins(ctx.encoder.transform(rows))

    def late_config() -> dict[str, Any]:
        return {"statistics": wire_statistics, **({"stand_ins": stand_ins()} if coarse is not None else {})}

    stages, done = [], 0
    for phase, rounds in spec.phase_rounds(type(model).phases):
        stages.append(
            Stage(
                model,
                spec,
                rounds,
                f"{model.registry_name} {phase}".strip(),
                phase,
                done,
                budget_share=share,
                quality=table_quality(model, ctx.handshake, ctx.settings),
                controller=controller,
                late_config=late_config,
            )
        )
        done += rounds
    return stages


def _round_stages(spec: StageSpec, model: Any, share: float, ctx: _Context) -> list[Stage]:
    """One stage per phase (or one) of a sequence or risk model."""
    fed = ctx.settings.federation
    wire_statistics = _encoded_statistics(type(model), ctx.handshake)
    table, encoder = ctx.table, ctx.encoder

    @functools.cache
    def profiles() -> np.ndarray:  # drawn from the trained static generator (post-processing)
        return encoder.transform(table.sample(ctx.settings.export.round_sample_rows, seed=fed.seed))

    def late_config() -> dict[str, Any]:
        extra: dict[str, Any] = {"statistics": wire_statistics}
        if model.kind == ModelKind.SEQUENCE_GENERATOR:
            # Realistic profiles, yet no record in them (samples of the DP-trained static generator).
            extra["stand_ins"] = encode_stand_ins(profiles())
        return extra

    score: Callable[[int], float] = _no_score
    if model.kind == ModelKind.SEQUENCE_GENERATOR and SEQUENCE_MOMENTS in ctx.handshake.statistics:
        score = sequence_scorer(model, profiles, ctx.handshake.statistics[SEQUENCE_MOMENTS])
    stages, done = [], 0
    for phase, rounds in spec.phase_rounds(type(model).phases):
        label = f"{model.registry_name} {phase}".strip()
        stages.append(
            Stage(model, spec, rounds, label, phase, done, share, score=score, late_config=late_config)
        )
        done += rounds
    return stages


@dataclass
class PlannedRun:
    """The plan's models by role, and its stages in order."""

    table: Any  # the static generator whose samples are released
    sequence: Any | None  # the sequence generator linked to it, if the plan has one
    risk_models: list[Any]
    stages: list[Stage]


def plan_stages(settings: RunSettings, encoder: TabularEncoder, handshake: HandshakeResult) -> PlannedRun:
    """The plan's stages in order, each model built once (a phased model's stages share it)."""
    ctx = _Context(settings, encoder, handshake)
    run = PlannedRun(None, None, [], [])
    for spec, share in zip(settings.stages, budget_shares(settings), strict=True):
        model = build_model(spec.model, encoder, settings)
        if model.kind in STATIC_GENERATOR_KINDS:  # a refiner sees the generator before it as ctx.table
            run.stages += _static_stages(spec, model, share, ctx)
            ctx.table = run.table = model
            continue
        if model.kind == ModelKind.SEQUENCE_GENERATOR:
            run.sequence = model
        else:
            run.risk_models.append(model)
        run.stages += _round_stages(spec, model, share, ctx)
    return run
