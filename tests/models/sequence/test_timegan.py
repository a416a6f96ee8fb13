"""Tests for models.sequence.timegan: networks, registration, sampling, state and another schema."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.layers import DPGRU
from torch import nn

from configs.schema import CohortSchema
from models.encoder import TabularEncoder
from models.registry import get_model_class
from models.sequence.encoder import SequenceEncoder
from models.sequence.timegan import PHASES, TimeGAN
from models.statistics import histogram_counts
from privacy.dp_training import DPSpec
from privacy.ledger import PrivacyLedger
from tests.models.sequence.support import (
    CPU,
    DELTA,
    SIGMA,
    SMALL,
    _fit,
    _other_schema,
    _random_long_frame,
    _states_equal,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


# ---------------------------------------------------------------- networks
def test_network_shapes(encoder: TabularEncoder, weeks: np.ndarray, cond: np.ndarray) -> None:
    model = TimeGAN(encoder, SMALL)
    x, c = torch.from_numpy(weeks[:10]), torch.from_numpy(cond[:10])
    h = model.embedder(x, c)
    assert h.shape == (10, 7, 8) and h.min() >= 0 and h.max() <= 1
    x_tilde = model.recovery(h)
    assert x_tilde.shape == (10, 7, 5) and x_tilde.min() >= 0 and x_tilde.max() <= 1
    noise = model._noise(10, torch.Generator().manual_seed(0), CPU)
    assert noise.shape == (10, 7, 4 + 4 + 7)  # daily noise + the week's noise + the day's one-hot
    torch.testing.assert_close(noise[:, :, 8:], torch.eye(7).expand(10, -1, -1))
    week = noise[:, :, 4:8]
    torch.testing.assert_close(week, week[:, :1].expand(-1, 7, -1))  # one draw per week
    assert not torch.allclose(noise[:, 0, :4], noise[:, 1, :4])  # a fresh draw per day
    e_hat = model.generator(noise, c)
    assert e_hat.shape == (10, 7, 8)
    assert model.supervisor(e_hat).shape == (10, 7, 8)
    assert model.discriminator(h, c).shape == (10, 7, 1)
    # Record-reading modules carry Opacus's per-sample-gradient GRU; the generator does not need it.
    for name in ("embedder", "recovery", "supervisor", "discriminator"):
        assert isinstance(getattr(model, name).rnn, DPGRU), name
    assert type(model.generator.rnn) is nn.GRU


def test_timegan_is_registered() -> None:
    assert get_model_class("timegan") is TimeGAN
    assert TimeGAN.registry_name == "timegan"


# ---------------------------------------------------------------- sampling
def test_conditioning_changes_the_week(trained: TimeGAN, encoder: TabularEncoder) -> None:
    a = np.zeros((200, encoder.width), dtype=np.float32)
    b = np.zeros_like(a)
    for block in encoder.blocks:
        if block.kind == "categorical":
            a[:, block.start] = 1.0
            b[:, block.start + block.width - 1] = 1.0
        else:
            a[:, block.start], b[:, block.start] = 3.0, -3.0
    week_a, week_b = trained.sample_encoded(a, seed=5), trained.sample_encoded(b, seed=5)
    np.testing.assert_array_equal(trained.sample_encoded(a, seed=5), week_a)
    assert np.abs(week_a.mean(axis=0) - week_b.mean(axis=0)).max() > 1e-3


def test_public_conditions_are_valid_encoded_profiles(trained: TimeGAN, encoder: TabularEncoder) -> None:
    cond = trained.public_conditions(50, np.random.default_rng(0))
    assert cond.shape == (50, encoder.width)
    for block in encoder.categorical_blocks():
        np.testing.assert_array_equal(cond[:, block.start : block.start + block.width].sum(axis=1), 1.0)
    # They decode to rows of the schema.
    assert len(encoder.inverse_transform(cond)) == 50


def test_samples_are_linked_to_profiles_and_inside_ranges(
    trained: TimeGAN, schema: CohortSchema, cohort
) -> None:
    static = cohort.static.head(9)
    frame = trained.sample(static, seed=3)
    assert list(frame.columns) == ["patient_id", "day", *(c.name for c in schema.sequence.channels)]
    assert len(frame) == 9 * 7
    assert frame["patient_id"].tolist() == np.repeat(static["patient_id"].to_numpy(), 7).tolist()
    assert frame["day"].tolist() == list(range(1, 8)) * 9
    for channel in schema.sequence.channels:
        assert frame[channel.name].between(channel.min, channel.max).all(), channel.name
    # Encoded conditions give the same weeks (ids are then generated).
    from_cond = trained.sample(trained.encoder.transform(static), seed=3)
    assert from_cond["patient_id"].iloc[0] == "S000001"
    np.testing.assert_array_equal(from_cond.iloc[:, 2:].to_numpy(), frame.iloc[:, 2:].to_numpy())
    assert not trained.sample(static, seed=4).equals(frame)
    assert trained.sample_encoded(np.zeros((0, trained.cond_dim), np.float32), seed=0).shape == (0, 7, 5)


def test_sampling_does_not_change_the_state(trained: TimeGAN, cond: np.ndarray) -> None:
    before = trained.state_dict()
    trained.sample_encoded(cond, seed=1)
    assert _states_equal(trained.state_dict(), before)


# ---------------------------------------------------------------- state
def test_state_dict_round_trip_gives_identical_samples(
    trained: TimeGAN, encoder: TabularEncoder, cond: np.ndarray
) -> None:
    fresh = TimeGAN(encoder, SMALL, seed=99)
    assert not _states_equal(fresh.state_dict(), trained.state_dict())
    fresh.load_state_dict(trained.state_dict())
    assert _states_equal(fresh.state_dict(), trained.state_dict())
    np.testing.assert_array_equal(fresh.sample_encoded(cond, seed=7), trained.sample_encoded(cond, seed=7))

    sampler_only = TimeGAN(encoder, SMALL, seed=98)
    sampler_only.load_state_dict(trained.sampler_state_dict(), strict=False)
    np.testing.assert_array_equal(
        sampler_only.sample_encoded(cond, seed=7), trained.sample_encoded(cond, seed=7)
    )
    assert {k.partition(".")[0] for k in trained.sampler_state_dict()} == {
        "generator",
        "supervisor",
        "recovery",
    }
    with pytest.raises(KeyError, match="no weights for the embedder"):
        TimeGAN(encoder, SMALL).load_state_dict(trained.sampler_state_dict())
    with pytest.raises(KeyError, match="unexpected"):
        TimeGAN(encoder, SMALL).load_state_dict({"critic.weight": torch.zeros(1)}, strict=False)
    # a state whose generator has another shape (an older MindFed's) changes nothing
    other = TimeGAN(encoder, {**SMALL, "week_noise_dim": 0}, seed=3)
    target = TimeGAN(encoder, SMALL, seed=4)
    before = target.state_dict()
    with pytest.raises(ValueError, match=r"generator\.rnn\..* has shape"):
        target.load_state_dict(other.state_dict())
    assert _states_equal(target.state_dict(), before)


def test_state_dict_is_a_detached_cpu_copy(trained: TimeGAN) -> None:
    state = trained.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    for tensor in state.values():
        tensor.add_(1.0)
    assert _states_equal(trained.state_dict(), before)
    assert all(not t.requires_grad and t.device.type == "cpu" for t in trained.state_dict().values())


# ---------------------------------------------------------------- another schema
def test_model_follows_another_schema() -> None:
    other = _other_schema()
    rng = np.random.default_rng(5)
    static = pd.DataFrame(
        {
            "pid": [f"X{i}" for i in range(60)],
            "score": rng.uniform(0, 10, 60),
            "group": rng.choice(["a", "b"], 60),
        }
    )
    encoder = TabularEncoder.from_histograms(other, histogram_counts(static, other))
    weeks = SequenceEncoder.from_schema(other).transform(_random_long_frame(other, 60, rng), static["pid"])
    model = TimeGAN(encoder, SMALL)
    ledger = PrivacyLedger(max_epsilon=50.0, delta=DELTA)
    for phase in PHASES:
        dp = DPSpec(noise_multiplier=SIGMA, clipping_norm=1.0, ledger=ledger) if phase == "joint" else None
        _fit(model, weeks, encoder.transform(static), phase, dp=dp)
    frame = model.sample(static.head(4), seed=0)
    assert list(frame.columns) == ["pid", "visit", "temp", "mood", "calls"]
    assert len(frame) == 4 * 5 and frame["visit"].max() == 5
    assert frame["temp"].between(35, 42).all() and frame["mood"].between(-5, 5).all()
    assert model.sample_encoded(encoder.transform(static), seed=0).shape == (60, 5, 3)
