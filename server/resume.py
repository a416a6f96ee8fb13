"""Checkpoints after every completed round, and a resumed run put back where it stopped."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from configs.settings import RunSettings
from models.encoder import TabularEncoder
from models.releases.catalog import get_release
from privacy.storage import atomic_write_text
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    RunProgress,
    flat_settings,
    ledger_summaries,
    now_iso,
    round_log_dicts,
    save_checkpoint,
)
from server.handshake import HandshakeResult
from server.plan import Stage
from server.rounds import StageOutcome, StageStart
from strategies.rounds import RoundLog

logger = logging.getLogger(__name__)


class Checkpointer:
    """Writes `out/checkpoint/` after every completed round and puts a resumed run back in place.

    A checkpoint holds the global weights of every model (and the controller's best round),
    the strategy and SA-DQC state, the round logs and scores so far, the handshake's DP
    statistics (so a resume spends no epsilon on them again) and each hospital's latest epsilon.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        federation_id: str,
        settings: RunSettings,
        encoder: TabularEncoder,
        handshake: HandshakeResult,
        stages: list[Stage],
    ):
        self.out_dir, self.federation_id, self.settings = Path(out_dir), federation_id, settings
        self.encoder, self.handshake, self.stages = encoder, handshake, stages
        self.rounds: list[RoundLog] = []  # of completed stages
        self.scores: dict[str, dict[int, float]] = {}

    def _models(self) -> dict[str, Any]:
        return {stage.model.registry_name: stage.model for stage in self.stages}

    def stage_finished(self, stage: Stage, outcome: StageOutcome) -> None:
        self.rounds.extend(outcome.rounds)
        self.scores[stage.label] = outcome.scores

    def after_round(
        self,
        stage: Stage,
        server_round: int,
        next_arrays: ArrayRecord,
        best: ArrayRecord | None,
        logs: list[RoundLog],
        scores: dict[int, float],
    ) -> None:
        name = stage.model.registry_name
        weights = {n: ArrayRecord(m.state_dict()) for n, m in self._models().items() if n != name}
        weights[name] = next_arrays
        if best is not None:
            weights[f"{name}.best"] = best
        all_logs = [*self.rounds, *logs]
        index = self.stages.index(stage)
        hospitals = {h.hospital: asdict(h) for h in self.handshake.hospitals.values()}
        progress = RunProgress(
            federation_id=self.federation_id,
            settings=flat_settings(self.settings),
            encoder_json=self.encoder.to_json(),
            stage_index=index,
            stage_label=stage.label,
            rounds_done=server_round,
            total_rounds_done=sum(s.rounds for s in self.stages[:index]) + server_round,
            hospitals=hospitals,
            refusals=self.handshake.refusals,
            releases=sorted(self.handshake.statistics),
            controller=self.stages[0].controller.state_dict() if self.stages[0].controller else None,
            round_logs=round_log_dicts(all_logs),
            stage_scores={
                **{k: {str(r): v for r, v in s.items()} for k, s in self.scores.items()},
                stage.label: {str(r): v for r, v in scores.items()},
            },
            ledger_summaries=ledger_summaries(
                {h.hospital: h for h in self.handshake.hospitals.values()}, all_logs
            ),
            written_at=now_iso(),
        )
        if stage.controller is not None:  # also on its own, for an operator to read
            atomic_write_text(
                self.out_dir / "state" / f"sadqc-{name}.json", json.dumps(stage.controller.state_dict())
            )
        save_checkpoint(
            self.out_dir,
            progress,
            weights=weights,
            statistics={
                name: get_release(name).to_arrays(value) for name, value in self.handshake.statistics.items()
            },
        )
        logger.info("checkpoint: %s round %d of %d written", stage.label, server_round, stage.rounds)

    def restore(self, checkpoint: Checkpoint) -> tuple[int, StageStart]:
        """Load the checkpoint's weights and state; returns the stage to go on with and its start."""
        saved = checkpoint.progress
        index, stage = saved.stage_index, self.stages[saved.stage_index]
        if stage.label != saved.stage_label or stage.rounds < saved.rounds_done:
            raise CheckpointError(
                f"checkpoint is at {saved.stage_label} round {saved.rounds_done}, which this plan "
                f"({stage.label}, {stage.rounds} rounds) does not have"
            )
        for name, model in self._models().items():
            if checkpoint.has(name):
                model.load_state_dict(checkpoint.weights(name).to_torch_state_dict())
        if saved.controller is not None and self.stages[0].controller is not None:
            self.stages[0].controller.state = (
                type(self.stages[0].controller).from_state(saved.controller).state
            )
        logs, scores = saved.logs(), saved.scores()
        labels = [s.label for s in self.stages[:index]]
        self.rounds = [log for log in logs if log.stage in labels]
        self.scores = {label: scores.get(label, {}) for label in labels}
        name = stage.model.registry_name
        best = checkpoint.weights(f"{name}.best") if checkpoint.has(f"{name}.best") else None
        if saved.rounds_done == stage.rounds:  # the stage was complete: its model ends on its best
            if best is not None:
                stage.model.load_state_dict(best.to_torch_state_dict())
            self.stage_finished(
                stage,
                StageOutcome([log for log in logs if log.stage == stage.label], scores.get(stage.label, {})),
            )
            return index + 1, StageStart()
        return index, StageStart(
            first_round=saved.rounds_done + 1,
            arrays=checkpoint.weights(name),
            best=best,
            scores=scores.get(stage.label, {}),
            logs=[log for log in logs if log.stage == stage.label],
        )
