"""A node's privacy plan per model: fixed target epsilon, kept across a resume, re-spread after a redo."""

from __future__ import annotations

import pytest

from client.tasks import fits_target, plan_noise_multiplier, plan_target_epsilon
from configs.wire import TrainRequest
from privacy.facade import steps_per_epoch
from privacy.ledger import PrivacyLedger

N_RECORDS = 400
BATCH = 50


def _request(rounds_remaining: int) -> TrainRequest:
    return TrainRequest(
        model="dp-ctgan",
        model_params={},
        encoder_json="{}",
        encoder_hash="",
        server_round=1,
        model_rounds=rounds_remaining,
        rounds_before=0,
        budget_share=0.5,
        local_epochs=1,
        batch_size=BATCH,
        seed=0,
    )


def _train_round(ledger: PrivacyLedger, sigma: float) -> None:
    per_epoch = steps_per_epoch(N_RECORDS, BATCH)
    # what Opacus's optimizer hook does to the shared accountant, then the ledger's log entry
    ledger.accountant.history.append((sigma, 1 / per_epoch, per_epoch))
    ledger.record_training("round", noise_multiplier=sigma, sample_rate=1 / per_epoch, steps=per_epoch)


def _ledger_after_handshake() -> PrivacyLedger:
    ledger = PrivacyLedger(max_epsilon=5.0, delta=1e-5)
    ledger.charge_gaussian("handshake", noise_multiplier=3.0)
    return ledger


def test_target_is_the_models_share_of_what_is_left() -> None:
    ledger = _ledger_after_handshake()
    spent = ledger.spent()
    assert plan_target_epsilon(ledger, _request(4)) == pytest.approx(spent + 0.5 * (5.0 - spent))


def test_planned_sigma_spends_the_target_over_the_rounds_and_a_resume_keeps_it() -> None:
    ledger = _ledger_after_handshake()
    target = plan_target_epsilon(ledger, _request(4))
    sigma = plan_noise_multiplier(ledger, n_records=N_RECORDS, request=_request(4))
    for done in range(2):
        _train_round(ledger, sigma)
        # a resume after round `done + 1` finds the plan still fits the rounds left
        assert fits_target(
            ledger, n_records=N_RECORDS, request=_request(3 - done), sigma=sigma, target=target
        )
    for _ in range(2):
        _train_round(ledger, sigma)
    assert target * 0.97 <= ledger.spent() <= target + 1e-9


def test_a_round_charged_twice_is_re_spread_within_the_same_target() -> None:
    ledger = _ledger_after_handshake()
    target = plan_target_epsilon(ledger, _request(4))
    sigma = plan_noise_multiplier(ledger, n_records=N_RECORDS, request=_request(4))
    _train_round(ledger, sigma)
    _train_round(ledger, sigma)  # round 2, trained before the server crashed
    # the resumed run asks for round 2 again: three rounds left on the plan, but two were charged
    assert not fits_target(ledger, n_records=N_RECORDS, request=_request(3), sigma=sigma, target=target)
    resigma = plan_noise_multiplier(ledger, n_records=N_RECORDS, request=_request(3), target_epsilon=target)
    assert resigma > sigma
    for _ in range(3):
        _train_round(ledger, resigma)
    assert ledger.spent() <= target + 1e-9
