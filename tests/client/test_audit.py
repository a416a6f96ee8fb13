"""The node's audit handler: its own sample from the model sent, one noisy charged release, once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client.app import audit
from client.egress import egress_problems
from configs import wire
from configs.settings import load_settings
from models.ctgan_dp import DPCTGAN
from models.encoder import TabularEncoder
from models.statistics import histogram_counts
from privacy.dp_audit import AUDIT_ATTACKS
from server.audit import audit_request
from simulation.cohort import generate_demo_cohort, write_cohort_folder

ROWS = 200
pytestmark = pytest.mark.usefixtures("server_task_identity")


@pytest.fixture
def node(tmp_path: Path) -> tuple[Context, RecordDict]:
    """A simulated hospital of 300 demo patients and an audit request for an untrained DP-CTGAN."""
    cohort = generate_demo_cohort(300, seed=3)
    write_cohort_folder(cohort, tmp_path / "cohort" / "hospital-1")
    overrides = {"audit.synthetic_rows": ROWS, "audit.bootstrap": 20}
    settings = load_settings(None, overrides)
    schema = settings.load_schema()
    encoder = TabularEncoder.from_histograms(schema, histogram_counts(cohort.static, schema))
    model = DPCTGAN(encoder, {"generator_dims": [16], "discriminator_dims": [16], "embedding_dim": 8})
    content = audit_request(model, settings, budget_share=0.05, federation_id="f00d")
    run_config = {
        "cohort-dir": str(tmp_path / "cohort"),
        "out-dir": str(tmp_path / "out"),
        "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()),
    }
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config=run_config,
    )
    return context, content


def _ask(context: Context, content: RecordDict) -> Message:
    message = Message(content, dst_node_id=1, message_type=wire.AUDIT)
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink stamps it
    return audit(message, context)


def test_the_node_answers_with_noisy_counts_it_charged(node) -> None:
    context, content = node
    reply = _ask(context, content)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert egress_problems(wire.AUDIT, reply.content) == []
    counts = reply.content.array_records[wire.AUDIT_COUNTS]
    for name in AUDIT_ATTACKS:
        noisy = counts[name].numpy()
        assert noisy.shape[0] == 2
        assert not np.allclose(noisy, np.round(noisy))  # noised, not exact counts
    metrics = reply.content.metric_records[wire.METRICS]
    assert metrics["noise-sd"] > 1.0 and 0 < metrics["epsilon"] <= 5.0


def test_a_second_audit_of_the_same_federation_is_refused(node) -> None:
    context, content = node
    assert not _ask(context, content).has_error()
    again = _ask(context, content)
    assert again.has_error() and "answered the audit of federation 'f00d' already" in again.error.reason


def test_an_audit_without_the_model_is_refused(node) -> None:
    context, content = node
    del content.array_records[wire.MODEL]
    reply = _ask(context, content)
    assert reply.has_error() and "'model'" in reply.error.reason
