"""The egress guard: only classified records and keys leave a node."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.egress import egress_guard, egress_problems
from configs import wire

pytestmark = pytest.mark.usefixtures("server_task_identity")


def _train_reply(**extra_metrics: float) -> RecordDict:
    return RecordDict(
        {
            wire.ARRAYS: ArrayRecord({"w": Array(np.zeros(3))}),
            wire.METRICS: MetricRecord({"epsilon": 1.5, **extra_metrics}),
            wire.NODE_INFO: ConfigRecord({"hospital": "hospital-1"}),
        }
    )


def test_a_classified_reply_passes() -> None:
    assert egress_problems("train.generator", _train_reply()) == []


@pytest.mark.parametrize("leak", ["num-examples", "records-seen", "generator-loss-sum"])
def test_an_unclassified_metric_is_caught(leak: str) -> None:
    assert egress_problems("train.sequence", _train_reply(**{leak: 812.0})) == [f"'metrics.{leak}'"]


def test_an_unclassified_record_or_message_is_caught() -> None:
    content = _train_reply()
    content["rows"] = ArrayRecord({"x": Array(np.ones((2, 2)))})
    assert egress_problems("train.risk", content) == ["record 'rows'"]
    assert egress_problems("query.unknown", _train_reply()) != []


def test_the_guard_withholds_a_leaky_reply_and_passes_a_clean_one() -> None:
    request = Message(RecordDict(), dst_node_id=1, message_type="train.generator")
    request.metadata.__dict__["_message_id"] = request.object_id  # as the SuperLink stamps it
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def answer(content: RecordDict):
        return lambda message, ctx: Message(content, reply_to=message)

    clean = egress_guard(request, context, answer(_train_reply()))
    assert not clean.has_error()
    leaky = egress_guard(request, context, answer(_train_reply(**{"num-examples": 812.0})))
    assert leaky.has_error() and "metrics.num-examples" in leaky.error.reason
    assert "812" not in leaky.error.reason
