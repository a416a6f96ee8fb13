"""Tests for strategies.catalog: the strategy names, their params tables, and what gets built."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from strategies.aggregation import sum_metricrecords
from strategies.catalog import (
    STRATEGY_NAMES,
    FedAdamParams,
    build_strategy,
    build_validating_strategy,
    validate_strategy_params,
)
from strategies.validating import ValidatingStrategy


def test_the_catalog_names() -> None:
    assert STRATEGY_NAMES == ("fedavg", "fedprox", "fedadam")


@pytest.mark.parametrize(
    ("name", "params", "cls"),
    [("fedavg", {}, FedAvg), ("fedprox", {"proximal_mu": 0.1}, FedProx), ("fedadam", {}, FedAdam)],
)
def test_every_strategy_is_built_to_be_wrapped(name: str, params: dict, cls: type) -> None:
    strategy = build_strategy(name, params)
    assert type(strategy) is cls
    assert strategy.fraction_train == 1.0
    assert strategy.fraction_evaluate == 0.0
    assert (strategy.min_train_nodes, strategy.min_available_nodes, strategy.min_evaluate_nodes) == (1, 1, 0)
    assert strategy.weighted_by_key == "num-examples"
    assert strategy.train_metrics_aggr_fn is sum_metricrecords
    assert strategy.arrayrecord_key == "arrays"
    assert strategy.configrecord_key == "config"


def test_fedavg_takes_no_params_and_none_means_empty() -> None:
    assert type(build_strategy("fedavg")) is FedAvg
    assert type(build_strategy("fedavg", None)) is FedAvg


def test_fedprox_gets_its_mu() -> None:
    assert build_strategy("fedprox", {"proximal_mu": 2}).proximal_mu == 2.0


def test_fedadam_defaults_are_flowers() -> None:
    ours, flowers = build_strategy("fedadam", {}), FedAdam()
    for knob in FedAdamParams.model_fields:
        assert getattr(ours, knob) == getattr(flowers, knob), knob
    tuned = build_strategy("fedadam", {"eta": 0.01, "eta_l": 0.02, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-6})
    assert (tuned.eta, tuned.eta_l, tuned.beta_1, tuned.beta_2, tuned.tau) == (0.01, 0.02, 0.5, 0.9, 1e-6)


def test_an_unknown_strategy_names_the_allowed_ones() -> None:
    for call in (lambda: build_strategy("fedyogi", {}), lambda: validate_strategy_params("FedAvg")):
        with pytest.raises(ValueError) as raised:
            call()
        message = str(raised.value)
        assert "unknown strategy" in message
        assert "fedavg, fedprox, fedadam" in message


@pytest.mark.parametrize(
    ("name", "params", "named"),
    [
        ("fedavg", {"proximal_mu": 0.1}, "proximal_mu"),
        ("fedprox", {}, "proximal_mu"),
        ("fedprox", {"proximal_mu": 0.0}, "proximal_mu"),
        ("fedprox", {"proximal_mu": -1.0}, "proximal_mu"),
        ("fedprox", {"proximal_mu": "lots"}, "proximal_mu"),
        ("fedprox", {"proximal_mu": 0.1, "mu": 0.1}, "mu"),
        ("fedadam", {"beta_1": 1.0}, "beta_1"),
        ("fedadam", {"beta_2": -0.1}, "beta_2"),
        ("fedadam", {"eta": float("nan")}, "eta"),
        ("fedadam", {"tau": 0}, "tau"),
        ("fedadam", {"eta_l": float("inf")}, "eta_l"),
        ("fedadam", {"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_bad_params_are_named(name: str, params: dict, named: str) -> None:
    with pytest.raises(ValueError) as raised:
        build_strategy(name, params)
    message = str(raised.value)
    assert message.startswith(f"strategy {name!r} params: ")
    assert f"{named}:" in message


def test_params_are_checked_without_building() -> None:
    checked = validate_strategy_params("fedadam", {"eta": 0.3})
    assert checked.model_dump() == {"eta": 0.3, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    with pytest.raises(ValueError, match="proximal_mu"):
        validate_strategy_params("fedprox", {})


def test_build_validating_strategy_wraps_the_named_strategy() -> None:
    strategy = build_validating_strategy(
        "fedprox",
        {"proximal_mu": 0.1},
        action="generator",
        weights={"hospital-1": 12.5},
        min_replies=2,
        quorum_timeout_s=5.0,
        max_update_norm_ratio=3.0,
    )
    assert isinstance(strategy, ValidatingStrategy)
    assert type(strategy.inner) is FedProx
    assert (strategy.action, strategy.min_replies, strategy.quorum_timeout_s) == ("generator", 2, 5.0)
    assert (strategy.weights, strategy.max_update_norm_ratio) == ({"hospital-1": 12.5}, 3.0)
    assert strategy.weighted_by_key == "num-examples"
