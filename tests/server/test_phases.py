"""Stage guards of the server's run phases."""

from __future__ import annotations

import pytest

from server.phases import StageError, check_stage_trained
from strategies.fedavg import RoundLog


def test_a_stage_without_any_aggregated_round_stops_the_run() -> None:
    refused = [
        RoundLog(r, rejected=[{"hospital": "hospital-1", "reason": "config: extra field 'x'"}])
        for r in (1, 2)
    ]
    with pytest.raises(
        StageError, match=r"timegan joint: no round aggregated.*hospital-1: config: extra field"
    ):
        check_stage_trained("timegan joint", refused)
    check_stage_trained("timegan joint", [*refused, RoundLog(3, aggregated=True)])  # one is enough
    check_stage_trained("timegan joint", [])  # a resumed stage with no rounds left
