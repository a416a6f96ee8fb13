"""hhg in a simulated federation: refining pgm's cells in phased DP-SGD rounds, then exported and
sampled from its bundle alone (the coarse model travels inside it)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from configs import wire
from mindfed.cli import app
from models.bundle import load_bundle
from models.pgm.domain import to_cells
from simulation.runner import simulate
from tests.support.runs import recording_grid

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

PHASES = {"vae": 1, "diffusion": 1, "refine": 1}
TINY_HHG = {
    "federation.patients": 360,
    "federation.hospitals": 2,
    "federation.batch_size": 32,
    "stages": [
        {"model": "pgm", "epsilon_share": 0.6},
        {"model": "hhg", "phases": PHASES, "epsilon_share": 0.15},
    ],
    "model.pgm.iterations": 200,  # mirror descent on a tiny cohort: the default 1500 only cost time
    "model.hhg.hidden_dim": 16,
    "model.hhg.latent_dim": 4,
    "model.hhg.diffusion_steps": 8,
    "export.synthetic_rows": 300,
    "export.round_sample_rows": 100,
    "audit.synthetic_rows": 200,
    "audit.bootstrap": 20,
    "audit.release_on_fail": True,
    "risk.synthetic_models": [],  # the stages above replace the plan: no risk model
}


@pytest.fixture(scope="module")
def hhg_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("hhg-run")
    with recording_grid() as (sent, _):
        outcome = simulate(config=None, overrides=TINY_HHG, out_dir=out)
    return outcome, sent


def test_each_phase_trains_in_its_own_rounds_with_the_coarse_models_stand_ins(hhg_run) -> None:
    outcome, sent = hhg_run
    rounds = [(r["stage"], r["round"]) for r in outcome.metrics["rounds"]]
    assert rounds == [("hhg vae", 1), ("hhg diffusion", 1), ("hhg refine", 1)]  # rounds count per phase
    assert all(r["aggregated"] for r in outcome.metrics["rounds"])
    trains = [m for m in sent if m.metadata.message_type == "train.generator"]
    assert trains and all(m.content.config_records[wire.CONFIG]["stand-ins"] for m in trains)
    assert {str(m.content.config_records[wire.CONFIG]["phase"]) for m in trains} == set(PHASES)
    assert all(h["epsilon"] <= 5.0 + 1e-9 for h in outcome.metrics["hospitals"])


def test_the_released_table_is_hhgs_and_keeps_pgms_cells(hhg_run, tmp_path: Path) -> None:
    outcome, _ = hhg_run
    model, card = load_bundle(outcome.out_dir / "bundle")
    assert card["name"] == "mindfed-hhg" and model.coarse is not None and model.coarse.registry_name == "pgm"
    target = tmp_path / "generated.csv"
    result = CliRunner().invoke(
        app, ["generate", "--model", str(outcome.out_dir / "bundle"), "-n", "200", "--out", str(target)]
    )
    assert result.exit_code == 0, result.output
    generated = pd.read_csv(target)
    schema = model.encoder.schema
    # the same seed: hhg's rows sit in exactly the cells its coarse pgm drew
    coarse_cells = to_cells(model.coarse.sample(200, seed=0), schema)
    assert (to_cells(generated, schema) == coarse_cells).all()
