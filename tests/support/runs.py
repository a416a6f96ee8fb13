"""The tiny simulated federation several test modules read: one run per test session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from simulation.runner import SimulationOutcome, simulate

# DP-CTGAN (trained in rounds, with SA-DQC) and a tiny TimeGAN: every kind of round and message.
TINY: dict[str, Any] = {
    "federation.patients": 360,
    "federation.hospitals": 2,
    "stages.0.model": "dp-ctgan",
    "stages.0.rounds": 2,
    "federation.batch_size": 32,
    "export.synthetic_rows": 500,
    "export.round_sample_rows": 200,
    "audit.synthetic_rows": 400,
    "audit.bootstrap": 50,
    # tiny cohorts: the audit's verdict is chance; the release is what these runs check
    "audit.release_on_fail": True,
    "model.dp-ctgan.generator_dims": [32],
    "model.dp-ctgan.discriminator_dims": [32],
    "model.dp-ctgan.embedding_dim": 16,
    "model.timegan.hidden_dim": 8,
    "model.timegan.num_layers": 1,
    "stages.timegan.phases": {"embedding": 1, "supervised": 1, "joint": 1},
    # one federated DP risk round and two small synthetic-route risk models
    "stages.transformer": False,
    "stages.hybrid-lstm.rounds": 1,
    "stages.hybrid-lstm.epsilon_share": 0.1,  # with the transformer's share: the plan spends it all
    "model.hybrid-lstm.hidden_dim": 8,
    "model.hybrid-lstm.lstm_hidden_dim": 4,
    "model.hybrid-lstm.synthetic_epochs": 2,
    "model.gbm.max_iter": 20,
    "risk.synthetic_models": ["hybrid-lstm", "gbm"],
}
# The static generator alone (and the tiny run's risk round), with the budget TimeGAN would have had.
NO_SEQUENCE = {"stages.timegan": False, "stages.0.epsilon_share": 0.61}
# No risk model at all: for runs that test something else and should stay quick.
NO_RISK = {"stages.hybrid-lstm": False, "stages.transformer": False, "risk.synthetic_models": []}
NO_RISK_OVERRIDES = "stages.hybrid-lstm=false stages.transformer=false risk.synthetic_models=[]"


@contextlib.contextmanager
def recording_grid() -> Iterator[tuple[list[Message], list[Message]]]:
    """Every message the server pushes and every reply it pulls, while the block runs."""
    sent: list[Message] = []
    replies: list[Message] = []
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages

    def recording_push(self, messages):
        messages = list(messages)
        sent.extend(messages)
        return push(self, messages)

    def recording_pull(self, message_ids):
        pulled = list(pull(self, message_ids))
        replies.extend(pulled)
        return pulled

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InMemoryGrid, "push_messages", recording_push)
        patch.setattr(InMemoryGrid, "pull_messages", recording_pull)
        yield sent, replies


def recorded_simulation(overrides: dict[str, Any], out_dir: Path) -> tuple[SimulationOutcome, list[Message]]:
    """A simulated run and every reply that reached the server."""
    with recording_grid() as (_, replies):
        outcome = simulate(config=None, overrides=overrides, out_dir=out_dir)
    return outcome, replies
