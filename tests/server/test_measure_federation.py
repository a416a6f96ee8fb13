"""Private-PGM through Flower's simulation engine: the model comes from summed noisy tables only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from safetensors.torch import load_file

from configs.schema import load_schema
from configs.settings import load_settings
from models.encoder import TabularEncoder
from models.pgm.marginals import Measurement, clique_of
from models.pgm.model import PrivatePGM
from simulation.runner import simulate
from tests.support.egress import egress_violations
from tests.support.runs import NO_RISK, recording_grid

pytestmark = pytest.mark.integration

TINY = {
    "federation.patients": 400,
    "federation.hospitals": 2,
    "export.synthetic_rows": 400,
    "export.round_sample_rows": 100,
    "audit.synthetic_rows": 200,
    "audit.bootstrap": 20,
    # tiny cohorts: the audit's verdict is chance; the release is what these tests check
    "audit.release_on_fail": True,
    "stages.timegan": False,
    "stages.pgm.epsilon_share": 0.75,
    "model.pgm.iterations": 200,
    **NO_RISK,
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory):
    """A pgm run, every message the server sends and every reply it gets kept."""
    with recording_grid() as (sent, replies):
        outcome = simulate(config=None, overrides=TINY, out_dir=tmp_path_factory.mktemp("pgm"))
    return outcome, sent, replies


def _measure_replies(replies: list[Message]) -> list[Message]:
    return [m for m in replies if m.metadata.message_type == "query.measure" and not m.has_error()]


def test_measurement_replies_hold_noisy_tables_and_public_facts_only(recorded) -> None:
    outcome, sent, replies = recorded
    measured = _measure_replies(replies)
    requests = [m for m in sent if m.metadata.message_type == "query.measure"]
    assert len(requests) == 2 * TINY["federation.hospitals"] and len(measured) == len(requests)
    for reply in measured:
        assert set(reply.content.metric_records["metrics"]) == {"noise-multiplier", "epsilon"}
        for name, array in reply.content.array_records["arrays"].items():
            table = array.numpy()
            # Gaussian noise on every cell: no exact count survives (an exact one would be whole)
            assert not np.any(table == np.round(table)), name
            assert table.ndim == len(clique_of(name)) <= 3
    assert egress_violations(replies) == []  # the default plan's static stage: every value classified
    for hospital in outcome.metrics["hospitals"]:  # the measurements are charged, within budget
        assert 4.9 < hospital["epsilon"] <= 5.0 + 1e-9


def test_the_model_is_the_estimate_from_the_summed_tables(recorded) -> None:
    outcome, sent, replies = recorded
    settings = load_settings(None, TINY)
    schema = load_schema()
    rounds: dict[int, list[Message]] = {}
    for reply in _measure_replies(replies):
        request = next(m for m in sent if m.metadata.message_id == reply.metadata.reply_to_message_id)
        rounds.setdefault(int(request.content.config_records["config"]["round-index"]), []).append(reply)
    # Redo the server's part by hand from the replies alone: sum, noise sd, estimate.
    bundle = Path(outcome.out_dir) / "bundle"
    encoder = TabularEncoder.from_json((bundle / "encoder.json").read_text(encoding="utf-8"), schema)
    model = PrivatePGM(encoder, settings.model.params_for("pgm"), seed=settings.federation.seed)
    for index in sorted(rounds):
        chosen = model.select_measurements(index, {})  # as the server chose: from earlier sums only
        total: dict[str, np.ndarray] = {}
        variance = 0.0
        for reply in sorted(rounds[index], key=lambda m: m.content.config_records["node-info"]["hospital"]):
            tables = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
            for key, table in tables.items():
                total[key] = total.get(key, 0.0) + table
            z = reply.content.metric_records["metrics"]["noise-multiplier"]
            variance += (z * math.sqrt(len(tables))) ** 2
        assert sorted(total) == sorted("|".join(c) for c in chosen)
        model.observe(total, math.sqrt(variance))
    assert {type(m) for m in model.measurements} == {Measurement}
    model.fit_statistics({})
    exported = load_file(str(bundle / "model.safetensors"))
    mine = model.state_dict()
    assert set(exported) == set(mine)
    assert all(np.allclose(exported[k].numpy(), mine[k].numpy(), atol=1e-6) for k in mine)
    card = json.loads((bundle / "model_card.json").read_text(encoding="utf-8"))
    assert card["model"] == "pgm"
