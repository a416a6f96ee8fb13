"""The Flower strategies a stage may aggregate with, by name, each with a validated params table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from strategies.aggregation import sum_metricrecords
from strategies.validating import ValidatingStrategy
from strategies.validation import DEFAULT_MAX_UPDATE_NORM_RATIO

# The weight key between the wrapper and the inner strategy (the handshake's weight, not a reply's).
WEIGHT_KEY = "num-examples"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FedAvgParams(_Params):
    """Flower's FedAvg takes no tunable parameters here."""


class FedProxParams(_Params):
    """FedProx: the weight of the proximal term each client adds to its loss (required).

    0 would make it FedAvg (choose "fedavg" for that), so it must be positive.
    """

    proximal_mu: float = Field(gt=0)


class FedAdamParams(_Params):
    """FedAdam's server-side Adam step; defaults are Flower's."""

    eta: float = Field(default=1e-1, gt=0)
    eta_l: float = Field(default=1e-1, gt=0)
    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)


_CATALOG: dict[str, tuple[type[FedAvg], type[_Params]]] = {
    "fedavg": (FedAvg, FedAvgParams),
    "fedprox": (FedProx, FedProxParams),
    "fedadam": (FedAdam, FedAdamParams),
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_CATALOG)


def validate_strategy_params(name: str, params: dict[str, Any] | None = None) -> _Params:
    """The checked params of strategy `name`, without building it (for validating a run plan).

    Raises:
        ValueError: `name` is not in STRATEGY_NAMES, or a parameter is unknown, missing or out
            of range (the message names the strategy and each offending parameter).
    """
    if name not in _CATALOG:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}")
    model = _CATALOG[name][1]
    try:
        return model.model_validate(params or {})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(table)'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"strategy {name!r} params: {problems}") from None


def build_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Flower's strategy `name` with `params`, set up to be wrapped by `ValidatingStrategy`.

    Every strategy samples all nodes it is shown (fraction_train=1, minima 1: the wrapper's
    bounded quorum wait replaces Flower's unbounded one), does no client-side evaluation,
    weighs updates by "num-examples" (the wrapper sets it to the server's weight for the
    hospital, never the reply's) and sums train metrics with `sum_metricrecords`.
    """
    checked = validate_strategy_params(name, params)
    strategy_class = _CATALOG[name][0]
    return strategy_class(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=0,
        min_available_nodes=1,
        weighted_by_key=WEIGHT_KEY,
        train_metrics_aggr_fn=sum_metricrecords,
        **checked.model_dump(),
    )


def build_validating_strategy(
    name: str,
    params: dict[str, Any] | None = None,
    *,
    action: str,
    weights: Mapping[str, float],
    min_replies: int = 1,
    quorum_timeout_s: float = 600.0,
    max_update_norm_ratio: float = DEFAULT_MAX_UPDATE_NORM_RATIO,
) -> ValidatingStrategy:
    """`build_strategy(name, params)` wrapped in a `ValidatingStrategy` (one stage's strategy)."""
    return ValidatingStrategy(
        build_strategy(name, params),
        action=action,
        weights=weights,
        min_replies=min_replies,
        quorum_timeout_s=quorum_timeout_s,
        max_update_norm_ratio=max_update_norm_ratio,
    )
