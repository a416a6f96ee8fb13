"""On CUDA: one DP-SGD round of every federated round model under its bf16 path, weights back on CPU.

Skipped without a CUDA GPU. Collection imports no model (the registry lists names only) and the
model side (Opacus, pandas) is imported inside the tests, so collecting and skipping stays quick.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from models.registry import get_model_class, registered_models
from models.runtime import autocast_for, full_precision, resolve_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

CUDA = torch.device("cuda")
PATIENTS, BATCH = 200, 50


@pytest.fixture(scope="module")
def encoder_and_data() -> tuple[Any, Any]:
    from tests.support.round_models import demo_data

    return demo_data(PATIENTS, seed=21)


def _networks(model: Any) -> list[nn.Module]:
    return [value for value in vars(model).values() if isinstance(value, nn.Module)]


def _use(model: Any, data: Any) -> None:
    """What the trained model is for: sampling (generators) or predicting (risk models), on CPU."""
    from models.base import ModelKind

    kind = type(model).kind
    if kind == ModelKind.FEDERATED_GENERATOR:
        assert len(model.sample(20, seed=1)) == 20
    elif kind == ModelKind.SEQUENCE_GENERATOR:
        weeks = model.sample_encoded(data.profiles[:10], seed=1)
        assert weeks.shape[0] == 10 and np.isfinite(weeks).all()
    else:
        probabilities = model.predict_proba(data)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_auto_device_is_cuda_and_autocast_is_bf16() -> None:
    assert resolve_device("auto") == CUDA
    with autocast_for(CUDA):
        assert torch.is_autocast_enabled("cuda")
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16
    with full_precision(), autocast_for(CUDA):
        assert not torch.is_autocast_enabled("cuda")


@pytest.mark.parametrize("name", registered_models())
def test_a_dp_round_of_each_phase_runs_on_cuda(name: str, encoder_and_data: tuple[Any, Any]) -> None:
    from privacy.ledger import PrivacyLedger
    from tests.support.round_models import dp_round_plans, tiny_params, why_not_a_round_model

    reason = why_not_a_round_model(name)
    if reason:
        pytest.skip(reason)
    encoder, data = encoder_and_data
    model = get_model_class(name)(encoder, tiny_params(name), seed=3)
    before = model.state_dict()
    ledger = PrivacyLedger(max_epsilon=50.0, delta=1e-5)
    for plan in dp_round_plans(name, device=CUDA, ledger=ledger, batch_size=BATCH, seed=0):
        spent = ledger.spent()
        report = model.fit_round(data, plan)
        assert report.steps > 0, plan.phase
        assert ledger.spent() > spent, f"phase {plan.phase!r} charged nothing"
        # the networks are handed back on the CPU, where the node serialises and samples
        devices = {t.device.type for m in _networks(model) for t in (*m.parameters(), *m.buffers())}
        assert devices == {"cpu"}, plan.phase
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(v.device.type == "cpu" and v.dtype == before[k].dtype for k, v in after.items())
    assert any(not torch.equal(v, before[k]) for k, v in after.items())
    _use(model, data)
