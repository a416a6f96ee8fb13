"""One stage's federated rounds through its Flower strategy, wrapped to validate every reply."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from rich.progress import Progress

from configs.settings import RunSettings
from models.encoder import TabularEncoder
from server.plan import Stage, stage_request
from strategies.catalog import build_validating_strategy
from strategies.rounds import RoundLog

logger = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    rounds: list[RoundLog]
    scores: dict[int, float]


@dataclass
class StageStart:
    """Where a stage's rounds begin: round 1 from the model's weights, or mid-way from a checkpoint."""

    first_round: int = 1
    arrays: ArrayRecord | None = None  # what round `first_round` is sent (None: the model's weights)
    best: ArrayRecord | None = None  # the controller's best round so far
    scores: dict[int, float] = field(default_factory=dict)
    logs: list[RoundLog] = field(default_factory=list)


# after_round(stage, server_round, next_arrays, best_arrays, logs, scores): the checkpoint hook.
AfterRound = Callable[[Stage, int, ArrayRecord, ArrayRecord | None, list[RoundLog], dict[int, float]], None]


@dataclass
class _Scoring:
    """A stage's scores so far and the controller's best weights (the fallback before any)."""

    stage: Stage
    best: ArrayRecord
    scores: dict[int, float]

    def score(self, server_round: int, arrays: ArrayRecord, strategy: Any, train_config: Any) -> float:
        """Score the new global model; SA-DQC may accept it, keep the best or roll back to it."""
        stage = self.stage
        stage.model.load_state_dict(arrays.to_torch_state_dict())
        if stage.quality is None or stage.controller is None:
            return stage.score(server_round) if stage.score is not None else float("nan")
        decision = stage.controller.observe_round(server_round, stage.quality(server_round))
        logger.info(
            "SA-DQC %s round %d: %s (%s)", stage.label, server_round, decision.action, decision.reason
        )
        if decision.action == "accept":
            self.best = arrays
        elif decision.action == "rollback":
            strategy.override_arrays = self.best
        train_config["lr-multiplier"] = float(stage.controller.training_overrides()["lr_multiplier"])
        return decision.scores.overall if decision.scores else float("nan")


class _RoundClock:
    """Each round's wall time at the server and the server's own step (aggregation and scoring)."""

    def __init__(self) -> None:
        self.round_started = time.perf_counter()
        self.server_seconds = 0.0

    @contextlib.contextmanager
    def server_step(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.server_seconds = time.perf_counter() - started

    def round_done(self, logs: list[RoundLog], server_round: int) -> None:
        """Stamp the round's log (the last one, if it is this round's) and start the next round."""
        now = time.perf_counter()
        if logs and logs[-1].server_round == server_round:
            logs[-1].seconds, logs[-1].server_seconds = now - self.round_started, self.server_seconds
        self.round_started = now


def run_stage(
    grid: Grid,
    stage: Stage,
    *,
    encoder: TabularEncoder,
    settings: RunSettings,
    participants: set[int],
    progress: Progress,
    task: Any,
    federation_id: str = "",
    start: StageStart | None = None,
    after_round: AfterRound | None = None,
    hospital_names: dict[int, str] | None = None,
    weights: Mapping[str, float],
) -> StageOutcome:
    """The stage's Flower strategy loop; the model ends holding its best (or last) weights.

    `weights` (hospital name -> the handshake's capped DP count) weigh each hospital's update.

    `after_round` is called once every round is complete (aggregated, scored, the controller's
    decision taken) with the weights the next round will be sent: the server checkpoints there.
    """
    fed = settings.federation
    start = start or StageStart()
    strategy = build_validating_strategy(
        stage.spec.strategy.name,
        stage.spec.strategy.params,
        action=stage.action,
        weights=weights,
        min_replies=fed.min_replies,
        quorum_timeout_s=fed.round_timeout_s,
        max_update_norm_ratio=fed.max_update_norm_ratio,
    )
    strategy.participants = participants
    strategy.hospital_names = hospital_names or {}
    strategy.rounds = list(start.logs)
    train_config = stage_request(stage, encoder, settings, federation_id)
    initial = start.arrays if start.arrays is not None else ArrayRecord(stage.model.state_dict())
    scoring = _Scoring(stage, start.best if start.best is not None else initial, dict(start.scores))
    if stage.controller is not None:
        train_config["lr-multiplier"] = float(stage.controller.training_overrides()["lr_multiplier"])

    clock = _RoundClock()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        with clock.server_step():
            score = scoring.score(server_round, arrays, strategy, train_config)
        scoring.scores[server_round] = score
        logger.info("%s round %d: quality score %.4f", stage.label, server_round, score)
        progress.update(task, advance=1, description=f"{stage.label} round {server_round}: {score:.3f}")
        return MetricRecord({"score": score})

    def round_done(server_round: int, next_arrays: ArrayRecord) -> None:
        for log in strategy.rounds:
            log.stage = stage.label
        clock.round_done(strategy.rounds, server_round)
        if after_round is not None:
            best = scoring.best if stage.controller is not None else None
            after_round(stage, server_round, next_arrays, best, strategy.rounds, scoring.scores)

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=stage.rounds,
        timeout=fed.round_timeout_s,
        train_config=train_config,
        evaluate_fn=evaluate,
        first_round=start.first_round,
        after_round=round_done,
    )
    check_stage_trained(stage.label, strategy.rounds)
    final = scoring.best if stage.controller is not None else result.arrays
    if len(final) > 0:  # the controller's best round, else the last aggregate
        stage.model.load_state_dict(final.to_torch_state_dict())
    return StageOutcome(strategy.rounds, scoring.scores)


class StageError(RuntimeError):
    """A stage ran its rounds but no hospital's update was ever aggregated: nothing was trained."""


def check_stage_trained(label: str, rounds: list[RoundLog]) -> None:
    """Refuse to go on (and export) with a model no round updated, naming the refusals.

    A round without enough valid updates keeps the global model as it was; if that happens in
    every round of a stage, the model is still its random initialisation.
    """
    if not rounds or any(log.aggregated for log in rounds):
        return
    reasons = sorted(
        {f"{r.get('hospital', '?')}: {r.get('reason', '?')}" for log in rounds for r in log.rejected}
    )
    shown = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
    raise StageError(
        f"{label}: no round aggregated any hospital's update, so the model is untrained; "
        f"refusals: {shown or 'none reported (no replies)'}"
    )
