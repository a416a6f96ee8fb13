"""Tests for models.sequence.stand_ins: stand-in profiles on the wire, drawn from, refused when malformed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models.encoder import EncoderError
from models.sequence.stand_ins import decode_stand_ins, encode_stand_ins
from models.sequence.timegan import TimeGAN

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def test_stand_ins_round_trip_and_are_drawn_from(trained: TimeGAN) -> None:
    pool = trained.public_conditions(30, np.random.default_rng(0))
    decoded = decode_stand_ins(encode_stand_ins(pool), trained.cond_dim)
    np.testing.assert_array_equal(decoded, pool)
    drawn = trained.stand_in_conditions(200, np.random.default_rng(1), decoded)
    rows = {row.tobytes() for row in trained.condition(pool)}  # as the networks see them
    assert drawn.shape == (200, trained.cond_dim) and all(row.tobytes() in rows for row in drawn)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"not an array", "not a readable"),
        (None, "shape"),  # wrong width
        (encode_stand_ins(np.full((3, 2), np.nan)), "shape"),
        ("nan", "NaN"),
    ],
)
def test_malformed_stand_ins_are_refused_by_name(trained: TimeGAN, blob: Any, match: str) -> None:
    width = trained.cond_dim
    if blob is None:
        blob = encode_stand_ins(np.zeros((3, width + 1)))
    elif blob == "nan":
        blob = encode_stand_ins(np.full((3, width), np.nan))
    with pytest.raises(EncoderError, match=f"stand-in profiles.*{match}"):
        decode_stand_ins(blob, width)
