"""A TimeGAN round on a node: the server's stand-in profiles reach the joint phase, bad ones are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.data import Cohort
from client.tasks import train_round
from configs.settings import load_settings
from configs.wire import TrainRequest
from models.encoder import EncoderError, TabularEncoder
from models.releases.base import encode_arrays
from models.sequence.stand_ins import encode_stand_ins
from models.sequence.timegan import TimeGAN
from models.statistics import histogram_counts
from privacy.ledger import PrivacyLedger
from simulation.cohort import generate_demo_cohort

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = {"hidden_dim": 8, "num_layers": 1, "noise_dim": 4, "generator_steps": 1}


@pytest.fixture(scope="module")
def setup() -> tuple[Cohort, TabularEncoder, TimeGAN]:
    settings = load_settings()
    demo = generate_demo_cohort(60, seed=3)
    cohort = Cohort(demo.static, demo.timeseries)
    encoder = TabularEncoder.from_histograms(
        settings.load_schema(), histogram_counts(demo.static, settings.load_schema())
    )
    return cohort, encoder, TimeGAN(encoder, SMALL, seed=0)


def _joint_request(encoder: TabularEncoder, stand_ins: bytes, statistics: dict[str, bytes]) -> TrainRequest:
    return TrainRequest(
        model="timegan",
        model_params=SMALL,
        encoder_json=encoder.to_json(),
        encoder_hash=encoder.hash,
        server_round=1,
        model_rounds=1,
        rounds_before=0,
        budget_share=1.0,
        local_epochs=1,
        batch_size=20,
        seed=0,
        phase="joint",
        stand_ins=stand_ins,
        statistics=statistics,
    )


def _round(
    setup: tuple[Cohort, TabularEncoder, TimeGAN],
    stand_ins: bytes,
    ledger: PrivacyLedger,
    statistics: dict[str, bytes] | None = None,
):
    cohort, encoder, model = setup
    return train_round(
        cohort,
        load_settings(),
        _joint_request(encoder, stand_ins, statistics or {}),
        state=model.state_dict(),
        ledger=ledger,
        noise_multiplier=1.0,
        device="cpu",
        seed=0,
    )


def test_joint_round_trains_on_the_servers_stand_ins(setup) -> None:
    *_, model = setup
    states = []
    for seed in (1, 2):  # two different pools: the generator learns from whichever it is sent
        pool = model.public_conditions(40, np.random.default_rng(seed))
        state, report = _round(setup, encode_stand_ins(pool), PrivacyLedger(max_epsilon=1e3, delta=1e-5))
        assert report.steps > 0
        states.append(state["generator.head.weight"])
    assert not torch.equal(*states)


@pytest.mark.parametrize("blob", [b"\x80\x81 not npy", "wrong-width"])
def test_malformed_stand_ins_are_refused_before_anything_is_charged(setup, blob) -> None:
    _, encoder, _ = setup
    if blob == "wrong-width":
        blob = encode_stand_ins(np.zeros((5, encoder.width + 2)))
    ledger = PrivacyLedger(max_epsilon=1e3, delta=1e-5)
    with pytest.raises(EncoderError, match="stand-in profiles"):
        _round(setup, blob, ledger)
    assert ledger.entries == [] and ledger.spent() == 0.0


@pytest.mark.parametrize(
    "statistics",
    [
        {"sequence-moments": b"not an npz"},
        {"sequence-moments": encode_arrays({"sums": np.zeros((7, 5))})},
        {"no-such-release": encode_arrays({"x": np.zeros(1)})},
    ],
    ids=["not-npz", "incomplete", "unknown"],
)
def test_malformed_statistics_from_the_server_are_refused_before_anything_is_charged(
    setup, statistics
) -> None:
    *_, model = setup
    ledger = PrivacyLedger(max_epsilon=1e3, delta=1e-5)
    pool = encode_stand_ins(model.public_conditions(40, np.random.default_rng(1)))
    with pytest.raises(EncoderError, match="the server's statistics are unusable"):
        _round(setup, pool, ledger, statistics)
    assert ledger.entries == [] and ledger.spent() == 0.0
