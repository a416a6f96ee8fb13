"""A measurement reply is checked before it is summed: a malformed one is that hospital's refusal."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from configs import wire
from configs.schema import load_schema
from configs.wire import MeasureRequest
from models.pgm.marginals import clique_of, clique_shape
from server.handshake import count_cell_bound
from server.measure import _reply_tables

pytestmark = pytest.mark.usefixtures("server_task_identity")

BOUND = count_cell_bound(100_000.0)
REQUEST = MeasureRequest(
    model="pgm", cliques=["age", "age|gender"], round_index=1, weights=[1.0, 2.0], budget_share=0.5
)


def _reply(spoil=None) -> Message:
    schema = load_schema()
    rng = np.random.default_rng(0)
    tables = {
        key: rng.normal(20.0, 3.0, clique_shape(clique_of(key), schema, None)) for key in REQUEST.cliques
    }
    if spoil is not None:
        spoil(tables)
    request = Message(
        RecordDict({wire.CONFIG: REQUEST.to_config()}), dst_node_id=1, message_type=wire.MEASURE
    )
    request.metadata.__dict__["_message_id"] = request.object_id  # as the SuperLink stamps it
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in tables.items()}),
            wire.METRICS: MetricRecord({"noise-multiplier": 3.0, "epsilon": 1.0}),
            wire.NODE_INFO: ConfigRecord({"hospital": "hospital-1"}),
        }
    )
    return Message(content, reply_to=request)


def test_a_sound_reply_is_summed() -> None:
    tables, z, epsilon = _reply_tables(_reply(), REQUEST, load_schema(), BOUND)
    assert set(tables) == {"age", "age|gender"} and (z, epsilon) == (3.0, 1.0)


def _huge(tables: dict) -> None:
    tables["age|gender"].flat[:2] = 1e308  # finite alone; summed with anything, inf


def _nan(tables: dict) -> None:
    tables["age"][0] = np.nan


def _missing(tables: dict) -> None:
    del tables["age"]


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [(_huge, "'age|gender' has a cell beyond"), (_nan, "'age' is malformed"), (_missing, "'age' is missing")],
)
def test_a_malformed_reply_is_refused_by_name(spoil, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        _reply_tables(_reply(spoil), REQUEST, load_schema(), BOUND)
