"""DP-CTGAN's pair loss: the DP pair tables' correlations reach the generator, bad targets are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.schema import load_schema
from models.ctgan_dp import DPCTGAN
from models.encoder import EncoderError, TabularEncoder
from models.statistics import histogram_counts
from simulation.cohort import generate_demo_cohort

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = {"embedding_dim": 16, "generator_dims": (32,), "discriminator_dims": (32,), "generator_lr": 2e-3}
PAIR = "dass_depression|dass_anxiety"


@pytest.fixture(scope="module")
def cohort_and_encoder():
    schema = load_schema()
    static = generate_demo_cohort(600, seed=5).static
    return static, TabularEncoder.from_histograms(schema, histogram_counts(static, schema))


def _synthetic_r(model: DPCTGAN, pair: str) -> float:
    a, _, b = pair.partition("|")
    sample = model.sample(3000, seed=1)
    return float(np.corrcoef(sample[a].astype(float), sample[b].astype(float))[0, 1])


def test_pair_loss_pulls_the_generated_correlation_to_the_target(cohort_and_encoder) -> None:
    static, encoder = cohort_and_encoder
    data = encoder.transform(static)
    results = {}
    for weight in (0.0, 5.0):
        model = DPCTGAN(encoder, {**SMALL, "pair_weight": weight}, seed=0)
        # A target far from the data's own r (about +0.6): only the pair loss can get there.
        model.fit(
            data,
            epochs=3,
            batch_size=64,
            dp=None,
            device=torch.device("cpu"),
            seed=0,
            pair_targets={PAIR: -0.5},
        )
        results[weight] = _synthetic_r(model, PAIR)
    assert results[5.0] < results[0.0] - 0.3, results


@pytest.mark.parametrize("targets", [{"gender|age": 0.2}, {"age|bmi": 1.5}, {"age": 0.1}])
def test_bad_pair_targets_are_refused_by_name(cohort_and_encoder, targets) -> None:
    static, encoder = cohort_and_encoder
    model = DPCTGAN(encoder, SMALL, seed=0)
    with pytest.raises(EncoderError, match="pair target"):
        model.fit(
            encoder.transform(static),
            epochs=1,
            batch_size=64,
            dp=None,
            device=torch.device("cpu"),
            seed=0,
            pair_targets=targets,
        )
