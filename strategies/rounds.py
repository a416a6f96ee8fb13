"""What a round did (RoundLog), why one could not start (QuorumError), and who sent a reply."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import Message

from configs.wire import NODE_INFO as NODE_INFO_KEY


@dataclass
class RoundLog:
    """Who took part in a round, what each reported, and what was refused and why."""

    server_round: int
    accepted: list[dict] = field(default_factory=list)
    stage: str = ""
    rejected: list[dict] = field(default_factory=list)
    aggregated: bool = False
    seconds: float = 0.0  # the round's wall time at the server, sent to scored
    server_seconds: float = 0.0  # of which the server's own step: aggregation and SA-DQC's scoring


class QuorumError(RuntimeError):
    """Fewer participating hospitals online than a round needs, for longer than the run tolerates."""


def hospital_of(message: Message) -> str:
    """The hospital name a node reports, falling back to its Flower node id."""
    if message.has_content() and NODE_INFO_KEY in message.content.config_records:
        return str(message.content.config_records[NODE_INFO_KEY].get("hospital", ""))
    return f"node-{message.metadata.src_node_id}"
