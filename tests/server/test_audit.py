"""The server's side of the DP audit: replies checked, hospitals pooled, rows for the report."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.dp_audit import AUDIT_ATTACKS
from server.audit import AuditAnswers, _pooled_parts, audit_rows
from server.report_gates import POOLED

EDGES = np.array([-3.0, -2.0, -1.0])


def _answers(edges_b: np.ndarray = EDGES) -> AuditAnswers:
    out = AuditAnswers()
    for hospital, edges, scale in (("a", EDGES, 1.0), ("b", edges_b, 2.0)):
        out.counts[hospital] = {
            name: np.array([[40.0, 30, 20, 10], [10, 8, 5, 2]]) * scale for name in AUDIT_ATTACKS
        }
        out.edges[hospital] = {name: edges for name in AUDIT_ATTACKS}
        out.noise_sd[hospital] = 3.0
    return out


def test_hospitals_on_the_same_bins_are_pooled_by_adding_their_counts() -> None:
    parts = _pooled_parts(_answers(), "distance")
    assert len(parts) == 1
    counts, noise_sd = parts[0]
    assert np.array_equal(counts, np.array([[120.0, 90, 60, 30], [30, 24, 15, 6]]))
    assert noise_sd == pytest.approx(3.0 * np.sqrt(2))


def test_hospitals_on_other_bins_are_pooled_by_vertical_averaging() -> None:
    parts = _pooled_parts(_answers(EDGES + 0.5), "density")
    assert len(parts) == 2


def test_rows_cover_every_hospital_and_the_pool() -> None:
    dcr, attacks = audit_rows(_answers(), n_bootstrap=20, seed=0)
    assert [d["hospital"] for d in dcr] == ["a", "b", POOLED]
    assert {(a["hospital"], a["name"]) for a in attacks} == {
        (h, n) for h in ("a", "b", POOLED) for n in AUDIT_ATTACKS
    }
    pooled = next(a for a in attacks if a["hospital"] == POOLED and a["name"] == "distance")
    assert pooled["n_members"] == 300 and pooled["n_nonmembers"] == 75


def _reply(counts: np.ndarray, edges: np.ndarray):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from configs import wire

    request = Message(RecordDict(), dst_node_id=1, message_type=wire.AUDIT)
    request.metadata.__dict__["_message_id"] = request.object_id  # as the SuperLink stamps it
    arrays = {name: Array(counts) for name in AUDIT_ATTACKS} | {
        f"{n}.edges": Array(edges) for n in AUDIT_ATTACKS
    }
    content = RecordDict(
        {
            wire.AUDIT_COUNTS: ArrayRecord(arrays),
            wire.METRICS: MetricRecord({"epsilon": 5.0, "noise-sd": 4.5}),
        }
    )
    return Message(content, reply_to=request)


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize(
    ("counts", "edges", "reason"),
    [
        (np.full((2, 4), np.nan), EDGES, "not finite"),
        (np.ones((3, 4)), EDGES, "shape"),
        (np.ones((2, 4)), EDGES[:2], "edges do not fit"),
        (np.ones((2, 4)), EDGES[::-1].copy(), "edges do not fit"),
    ],
)
def test_a_malformed_audit_reply_is_refused_by_name(counts, edges, reason: str) -> None:
    from server.audit import _reply_counts

    with pytest.raises(ValueError, match=reason):
        _reply_counts(_reply(counts, edges))
