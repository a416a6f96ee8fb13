"""The declared run plan: `[[stages]]`, each a registered model, its rounds, budget share and strategy."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StrategySpec(_Section):
    """Flower strategy that aggregates a stage's updates, by name, with its parameters."""

    name: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict)


class StageSpec(_Section):
    """One model's part of the run.

    `epsilon_share` is the share of each hospital's max epsilon this model may spend; with the
    handshake's `privacy.statistics_epsilon_share` the shares may add up to 1 at most, so a
    hospital's budget is split up front and no stage can eat another's.
    """

    model: str = Field(min_length=1)
    rounds: int = Field(default=0, ge=0)  # for a single-phase model trained in rounds
    # For a phased model (e.g. TimeGAN): rounds per phase, run in the model's own phase order.
    phases: dict[str, int] = Field(default_factory=dict)
    epsilon_share: float = Field(default=0.0, ge=0, le=1)
    strategy: StrategySpec = Field(default_factory=StrategySpec)

    def phase_rounds(self, model_phases: tuple[str, ...]) -> list[tuple[str, int]]:
        """(phase, rounds) in the model's phase order, phases with no rounds left out."""
        if not model_phases:
            return [("", self.rounds)] if self.rounds > 0 else []
        return [(phase, self.phases[phase]) for phase in model_phases if self.phases.get(phase, 0) > 0]

    @property
    def total_rounds(self) -> int:
        return self.rounds + sum(self.phases.values())


def _kind_problems(index: int, stage: StageSpec, model_class: type) -> list[str]:
    """Rounds and phases that do not fit the model's kind."""
    from models.base import ModelKind

    where = f"stages.{index} ({stage.model})"
    if not getattr(model_class, "federated", True):
        return [f"{where}: this model has no federated DP-SGD form; list it in [risk] synthetic_models"]
    phases: tuple[str, ...] = getattr(model_class, "phases", ())
    if model_class.kind == ModelKind.STATISTICS_GENERATOR:
        if stage.total_rounds:
            return [f"{where}: a statistics generator is fitted on the server and takes no rounds"]
        return []
    if phases:
        unknown = sorted(set(stage.phases) - set(phases))
        problems = (
            [f"{where}: unknown phase(s) {unknown}; the model's phases: {list(phases)}"] if unknown else []
        )
        if stage.rounds:
            problems.append(f"{where}: a phased model takes `phases`, not `rounds`")
        if not any(rounds > 0 for rounds in stage.phases.values()):
            problems.append(f"{where}: give at least one phase some rounds")
        return problems
    if stage.phases:
        return [f"{where}: the model has no phases; give `rounds`"]
    return [] if stage.rounds > 0 else [f"{where}: rounds must be at least 1"]


def _share_problems(index: int, stage: StageSpec, model_class: type) -> list[str]:
    """A model trained by DP-SGD at the hospitals needs some of their budget."""
    from models.base import ROUND_KINDS

    if model_class.kind in ROUND_KINDS and stage.epsilon_share <= 0:
        return [f"stages.{index} ({stage.model}): epsilon_share must be above 0 for DP-SGD rounds"]
    return []


def _order_problems(stages: list[StageSpec], kinds: list[Any]) -> list[str]:
    """The static generator first (its samples are released); a model that refines a coarse one
    (`refines_coarse`, e.g. hhg on pgm's cells) may follow it, and is then the one released."""
    from models.base import STATIC_GENERATOR_KINDS
    from models.registry import get_model_class

    static = [i for i, kind in enumerate(kinds) if kind in STATIC_GENERATOR_KINDS]
    names = [stages[i].model for i in static]
    if not static or len(static) > 2:
        return [f"the plan needs one static generator stage (or a coarse one and its refiner), got {names}"]
    if static[0] != 0:
        return [f"stages.0 must be the static generator ({stages[static[0]].model})"]
    refines = len(static) == 2 and getattr(get_model_class(names[1]), "refines_coarse", False)
    if len(static) == 2 and (static[1] != 1 or not refines):
        return [f"a second static stage must come right after the first and refine it, got {names}"]
    return []


def plan_problems(
    stages: list[StageSpec],
    statistics_share: float,
    model_params: dict[str, Any],
    kept_back: dict[str, float] | None = None,
) -> list[str]:
    """Everything wrong with a run plan, each naming its stage; empty when it is sound.

    Args:
        statistics_share: the handshake's share of each hospital's max epsilon.
        kept_back: the one-off releases after the stages (the privacy audit, the risk models'
            evaluation), each its share of max epsilon, kept back from the stages.
        model_params: the `[model.<name>]` tables, validated by each named model's Config.
    """
    from models.registry import UnknownModelError, get_model_class
    from strategies.catalog import validate_strategy_params

    if not stages:
        return ["the run plan has no [[stages]]"]
    problems: list[str] = []
    kinds = []
    for index, stage in enumerate(stages):
        try:
            model_class = get_model_class(stage.model)
        except UnknownModelError as err:
            problems.append(f"stages.{index}.model: {err.args[0]}")
            kinds.append(None)
            continue
        kinds.append(model_class.kind)
        problems += _kind_problems(index, stage, model_class)
        problems += _share_problems(index, stage, model_class)
        problems += params_problems(stage.model, model_params.get(stage.model, {}))
        try:
            validate_strategy_params(stage.strategy.name, stage.strategy.params)
        except ValueError as err:
            problems.append(f"stages.{index}.strategy: {err}")
    if None not in kinds:
        problems += _order_problems(stages, kinds)
    kept = {name: share for name, share in (kept_back or {}).items() if share > 0}
    total = statistics_share + sum(kept.values()) + sum(stage.epsilon_share for stage in stages)
    if total > 1 + 1e-9:
        shares = " + ".join(
            [f"{s:g} ({name})" for name, s in kept.items()]
            + [f"{s.epsilon_share:g} ({s.model})" for s in stages]
        )
        problems.append(
            f"epsilon shares add up to {total:g} > 1: {statistics_share:g} (handshake statistics) + {shares}"
        )
    names = [stage.model for stage in stages]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"a model may have one stage only: {repeated} repeat")
    return problems


def params_problems(name: str, params: Any) -> list[str]:
    """What is wrong with a registered model's `[model.<name>]` table, each by its dotted key."""
    from models.registry import get_model_class

    model_class = get_model_class(name)
    if not isinstance(params, dict):
        return [f"model.{name} must be a table of the model's parameters"]
    try:
        model_class.Config.model_validate(params)
    except ValidationError as err:  # name the dotted key, e.g. model.dp-ctgan.generator_lr
        return [f"model.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    return []
