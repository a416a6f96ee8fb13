"""Tests for models.sequence.losses: the moments and link losses see what they are there to see."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.sequence.losses import _link_loss
from models.sequence.moments import SequenceMoments
from tests.models.sequence.support import _moments_gap

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def test_moments_loss_sees_a_shared_daily_factor() -> None:
    """Same per-channel means and spreads, but every channel driven by one daily factor: the
    cross-channel terms of the loss must tell that from independent channels."""
    rng = np.random.default_rng(3)
    independent = 0.5 + 0.05 * rng.standard_normal((4000, 7, 5))
    shared = 0.5 + 0.05 * np.repeat(rng.standard_normal((4000, 7, 1)), 5, axis=2)
    target = SequenceMoments.of(independent)
    assert _moments_gap(independent.astype(np.float32), target) < 0.1
    assert _moments_gap(shared.astype(np.float32), target) > 1.0


def test_moments_loss_sees_a_start_up_transient() -> None:
    """Day 1 twice as wide as the other days and carrying into day 2: the day-by-day term alone
    tells it from steady weeks (other terms see parts of it too: lag-1, the weekly spread)."""
    rng = np.random.default_rng(4)
    steady = 0.5 + 0.05 * rng.standard_normal((4000, 7, 5))
    days = rng.standard_normal((4000, 7, 5))
    days[:, 0] *= 2.0
    days[:, 1] = (days[:, 1] + 0.5 * days[:, 0]) / np.sqrt(2.0)
    days *= 1 / days.std(axis=(0, 1), keepdims=True)
    transient = (0.5 + 0.05 * days).astype(np.float32)
    target = SequenceMoments.of(steady)
    gap = _moments_gap(transient, target)
    # the same loss, told the transient's own day-by-day covariance: what is left is the rest
    told = dataclasses.replace(target, day_by_day=SequenceMoments.of(transient).day_by_day)
    assert gap - _moments_gap(transient, told) > 0.1


def test_moments_loss_sees_a_weekend_dip_that_grows_with_the_level() -> None:
    """Same levels, spreads and day pattern on average, but the higher a week's level the deeper
    its weekend dip: only the level-by-day term can tell."""
    rng = np.random.default_rng(5)
    level = 0.05 * rng.standard_normal((4000, 1, 5))
    days = 0.03 * rng.standard_normal((4000, 7, 5))
    weekend = np.array([2, 2, 2, 2, 2, -5, -5])[None, :, None] / 7
    steady = 0.5 + level + days + 0.02 * weekend
    growing = 0.5 + level + days + 0.02 * weekend * (1 + level / 0.05)
    target = SequenceMoments.of(steady)
    steady_gap = _moments_gap(steady.astype(np.float32), target)
    # measured 0.455, 0.289 of it from the level-by-day term (the rest: the wider weekend days)
    assert _moments_gap(growing.astype(np.float32), target) > steady_gap + 0.3


def test_link_loss_sees_a_profile_entry_the_prior_does_not_explain() -> None:
    """Weeks = prior + independent spread: near zero. Weeks that also follow one more profile
    entry (of 6) than the prior does: that entry's missed shift shows."""
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(4000, 6, generator=generator)
    expected = 0.5 + 0.05 * cond[:, :1].repeat(1, 5)
    weeks = expected + 0.03 * torch.randn(4000, 5, generator=generator)
    fits = float(_link_loss(weeks, expected, cond))
    extra = float(_link_loss(weeks + 0.02 * cond[:, 3:4], expected, cond))
    # the missed shift is 0.02 on one of 5 x 11 (channel, regressor) terms: 0.0018 on the mean
    assert fits < 0.0015
    assert extra > fits + 0.0015
