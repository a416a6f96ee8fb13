"""End to end through Flower's real simulation engine: train, export, generate, refuse bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from configs.schema import load_schema
from configs.settings import load_settings
from mindfed.cli import app
from models.bundle import load_linked_bundle, sample_linked
from models.sequence_metrics import link_pairs
from server.checkpoint import CheckpointError
from server.resume import Checkpointer
from simulation.runner import prepare_demo_cohort, simulate
from tests.support.runs import NO_RISK, NO_SEQUENCE, TINY, recording_grid

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny_run(tiny_recorded_run):
    """The session's tiny run (`tests.support.runs.TINY`), shared with the audit's tests."""
    return tiny_recorded_run[0]


def test_run_exports_bundle_synthetic_table_and_metrics(tiny_run) -> None:
    out = tiny_run.out_dir
    schema = load_schema()
    synthetic = pd.read_csv(out / "synthetic" / "static.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    removed = sum(metrics["sadqc"]["removed"].values())  # SA-DQC's final anomaly filter
    assert 0 < removed <= 0.05 * TINY["export.synthetic_rows"]
    sadqc_state = json.loads((out / "state" / "sadqc-dp-ctgan.json").read_text())  # persisted per round
    assert len(sadqc_state["history"]) == TINY["stages.0.rounds"]
    assert len(synthetic) == TINY["export.synthetic_rows"] - removed
    assert list(synthetic.columns) == [schema.id_column, *schema.column_names]
    weeks = pd.read_csv(out / "synthetic" / "timeseries.csv")
    assert schema.sequence is not None
    assert len(weeks) == len(synthetic) * schema.sequence.length
    assert set(weeks[schema.id_column]) == set(synthetic[schema.id_column])  # every profile has its week
    card = json.loads((out / "bundle" / "model_card.json").read_text())
    stages = card["training"]["stages"]
    assert stages["dp-ctgan"]["rounds_aggregated"] == TINY["stages.0.rounds"]
    assert [k for k in stages if k.startswith("timegan")] == [
        "timegan embedding",
        "timegan supervised",
        "timegan joint",
    ]
    assert (out / "bundle" / "sequence" / "model_card.json").is_file()
    assert {h["hospital"] for h in card["privacy"]["hospitals"]} == {"hospital-1", "hospital-2"}
    ledger = {entry["hospital"]: entry for entry in card["privacy"]["ledger"]}
    for hospital in metrics["hospitals"]:  # every charge is in the card; the last one is the total
        charges = ledger[hospital["hospital"]]["entries"]
        assert [c["mechanism"] for c in charges[:3]] == ["gaussian"] * 3
        assert charges[-1]["epsilon_after"] == pytest.approx(hospital["epsilon"])
    assert [(r["stage"], r["round"]) for r in metrics["rounds"]][:2] == [("dp-ctgan", 1), ("dp-ctgan", 2)]
    assert all(r["aggregated"] and not r["rejected"] for r in metrics["rounds"])
    assert 0.0 <= metrics["demo_check"]["column_shape_vs_real"] <= 1.0
    # the weeks' links are scored on every pair the schema gives, not on a list of demo names
    links = {key.rsplit("/", 1)[0] for key in metrics["demo_check"]["sequence"] if key.startswith("link/")}
    assert links == {f"link/{column}~{channel}" for column, channel in link_pairs(schema)}


def test_every_hospital_epsilon_is_the_accountants_and_within_budget(tiny_run) -> None:
    max_epsilon = load_settings().privacy.max_epsilon
    for hospital in tiny_run.metrics["hospitals"]:
        # + one round per TimeGAN phase and the risk model's round
        assert hospital["rounds_trained"] == TINY["stages.0.rounds"] + 3 + TINY["stages.hybrid-lstm.rounds"]
        # the noise was calibrated to spend the budget: close to, never above, the max
        assert max_epsilon * 0.95 <= hospital["epsilon"] <= max_epsilon + 1e-9


def test_generate_from_exported_bundle(tiny_run, tmp_path: Path) -> None:
    target = tmp_path / "more.csv"
    result = CliRunner().invoke(
        app, ["generate", "--model", str(tiny_run.out_dir / "bundle"), "-n", "250", "--out", str(target)]
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(target)
    assert len(frame) == 250
    table, sequence, _ = load_linked_bundle(tiny_run.out_dir / "bundle")
    expected_static, expected_weeks = sample_linked(table, sequence, 250, seed=0)
    pd.testing.assert_frame_equal(frame, expected_static, check_dtype=False, atol=1e-9)
    weeks = pd.read_csv(tmp_path / "more_timeseries.csv")
    pd.testing.assert_frame_equal(weeks, expected_weeks, check_dtype=False, atol=1e-6)


def test_hospital_with_invalid_data_is_refused_and_run_goes_on(tmp_path: Path) -> None:
    # no risk model: the refusal happens at the handshake, what follows only needs the generator
    overrides = {**TINY, "federation.hospitals": 3, "stages.0.rounds": 1, **NO_SEQUENCE, **NO_RISK}
    cohort_dir = tmp_path / "cohort"
    prepare_demo_cohort(load_settings(None, overrides), cohort_dir)
    broken = cohort_dir / "hospital-2" / "static.csv"
    frame = pd.read_csv(broken).astype({"bmi": object})
    frame.loc[4, "bmi"] = "zz-unique-9f3a"  # a value found nowhere else
    patient = str(frame.loc[4, "patient_id"])
    frame.to_csv(broken, index=False)

    outcome = simulate(config=None, overrides=overrides, out_dir=tmp_path / "out", cohort_dir=cohort_dir)

    refusals = outcome.metrics["handshake_refusals"]
    assert len(refusals) == 1
    assert "hospital-2" in refusals[0]["reason"]
    assert "line 6, column 'bmi': not a number" in refusals[0]["reason"]
    # the coordinator learns where and what kind of problem, never the value or whose row it is
    for written in (tmp_path / "out").rglob("*.json"):
        text = written.read_text(encoding="utf-8")
        assert "zz-unique-9f3a" not in text and patient not in text, written
    assert {h["hospital"] for h in outcome.metrics["hospitals"]} == {"hospital-1", "hospital-3"}
    # a node that failed the handshake is not asked to train
    assert sorted(outcome.metrics["rounds"][0]["hospitals"]) == ["hospital-1", "hospital-3"]
    assert outcome.metrics["rounds"][0]["rejected"] == []


class ServerKilled(BaseException):
    """Raised right after a checkpoint, as a kill -9 of the server would cut the run there."""


def test_run_cut_after_a_round_resumes_at_the_next_and_matches_an_uncut_run(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cut"
    checkpoint = Checkpointer.after_round

    def killed_after_round_1(self, stage, server_round, *args) -> None:
        checkpoint(self, stage, server_round, *args)
        if stage.label == "dp-ctgan" and server_round == 1:
            raise ServerKilled

    monkeypatch.setattr(Checkpointer, "after_round", killed_after_round_1)
    with pytest.raises(RuntimeError, match="rerun with --resume"):
        simulate(config=None, overrides=TINY, out_dir=out)
    saved = json.loads((out / "checkpoint" / "checkpoint.json").read_text(encoding="utf-8"))
    assert (saved["stage_label"], saved["rounds_done"]) == ("dp-ctgan", 1)
    monkeypatch.undo()

    resumed = simulate(config=None, overrides=TINY, out_dir=out, resume=True)
    stages_rounds = [(r["stage"], r["round"]) for r in resumed.metrics["rounds"]]
    assert stages_rounds == [(r["stage"], r["round"]) for r in tiny_run.metrics["rounds"]]
    assert len(set(stages_rounds)) == len(stages_rounds)  # nothing redone
    assert all(r["aggregated"] and not r["rejected"] for r in resumed.metrics["rounds"])
    assert resumed.metrics["resumed"] is True
    assert resumed.metrics["federation_id"] == saved["federation_id"]
    # Same seed, nothing lost or redone: the very same synthetic data and epsilon as the uncut run
    # (a separate run of the same config: this is also the test that a seed gives the same data).
    assert resumed.metrics["bundle"]["encoder_hash"] == tiny_run.metrics["bundle"]["encoder_hash"]
    for name in ("static.csv", "timeseries.csv"):
        assert (out / "synthetic" / name).read_bytes() == (tiny_run.out_dir / "synthetic" / name).read_bytes()
    assert [h["epsilon"] for h in resumed.metrics["hospitals"]] == [
        h["epsilon"] for h in tiny_run.metrics["hospitals"]
    ]


def test_resume_is_refused_without_a_checkpoint_or_with_other_settings(tiny_run, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        simulate(config=None, overrides=TINY, out_dir=tmp_path / "empty", resume=True)
    other = {**TINY, "stages.0.rounds": 3}
    with pytest.raises(CheckpointError, match=r"stages: .*'rounds': 2.* -> .*'rounds': 3"):
        simulate(config=None, overrides=other, out_dir=tiny_run.out_dir, resume=True)


def test_stages_aggregate_with_fedprox_and_fedadam(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {
        **TINY,
        "stages.dp-ctgan.strategy": {"name": "fedprox", "params": {"proximal_mu": 0.5}},
        "stages.timegan.strategy": {"name": "fedadam", "params": {"eta": 0.01}},
    }
    with recording_grid() as (sent, _):
        outcome = simulate(config=None, overrides=overrides, out_dir=tmp_path)
    assert all(r["aggregated"] and not r["rejected"] for r in outcome.metrics["rounds"])
    assert len(outcome.metrics["rounds"]) == TINY["stages.0.rounds"] + 3 + TINY["stages.hybrid-lstm.rounds"]
    train = [m for m in sent if m.metadata.message_type.startswith("train.")]
    mu = {m.metadata.message_type: m.content.config_records["config"].get("proximal-mu") for m in train}
    # FedProx's mu reaches the nodes
    assert mu == {"train.generator": 0.5, "train.sequence": 0.0, "train.risk": 0.0}
    # FedAdam's server-side step moves TimeGAN elsewhere than FedAvg's average (the same run's).
    ours = (tmp_path / "synthetic" / "timeseries.csv").read_bytes()
    assert ours != (tiny_run.out_dir / "synthetic" / "timeseries.csv").read_bytes()


def test_every_round_records_its_timings_and_who_spent_them(tiny_run) -> None:
    rows = tiny_run.metrics["rounds"]
    for row in rows:
        assert row["seconds"] > 0 and 0 <= row["server_seconds"] <= row["seconds"]
        assert set(row["hospital_train_seconds"]) == set(row["hospitals"])
        for seconds in row["hospital_train_seconds"].values():  # coarse: whole tenths of a second
            assert seconds >= 0 and abs(seconds * 10 - round(seconds * 10)) < 1e-6
        assert 0.0 <= row["framework_share"] <= 1.0
    timings = tiny_run.metrics["timings"]
    assert list(timings) == list(dict.fromkeys(row["stage"] for row in rows))
    for stage in timings.values():
        shares = stage["hospitals_share"] + stage["server_share"] + stage["framework_share"]
        assert stage["seconds"] > 0 and shares == pytest.approx(1.0)
