"""The one DP-SGD session: charged at Opacus's real figures, never past max epsilon, FedProx survives."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp_training import DPSpec, dp_training
from privacy.facade import opacus_steps_per_epoch, planned_steps
from privacy.ledger import BudgetExceededError, PrivacyLedger

BATCH = 10


def _loader(n: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(n, generator=generator)
    return DataLoader(TensorDataset(x, y[:, None]), batch_size=BATCH)


def _train(module: nn.Module, n: int, dp: DPSpec | None, *, epochs: int = 1, mu: float = 0.0) -> int:
    torch.manual_seed(3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    with dp_training(
        module=module, optimizer=optimizer, data_loader=_loader(n), dp=dp, epochs=epochs, proximal_mu=mu
    ) as session:
        for _ in range(epochs):
            for x, y in session.data_loader:
                session.optimizer.zero_grad(set_to_none=True)
                ((session.module(x) - y) ** 2).sum().backward()
                session.optimizer.step()
    assert not hasattr(session.module, "_module"), "the session must end on the plain module"
    assert all(getattr(p, "grad_sample", None) is None for p in session.module.parameters())
    return session.steps


def test_opacus_draws_fewer_batches_than_naive_for_some_sizes() -> None:
    assert opacus_steps_per_epoch(93) == 92  # 1 / (1 / 93) = 92.999...
    assert opacus_steps_per_epoch(92) == 92
    assert planned_steps(930, BATCH) == (1 / 92, 92)  # Opacus charges q = 1 / len(DPDataLoader)


@pytest.mark.parametrize("n_batches", [93, 17])
def test_a_run_calibrated_to_max_epsilon_never_passes_it(n_batches: int) -> None:
    ledger = PrivacyLedger(max_epsilon=1.0, delta=1e-5)
    rate, per_epoch = planned_steps(n_batches * BATCH, BATCH)
    sigma = ledger.calibrate_noise_multiplier(target_epsilon=1.0, sample_rate=rate, steps=2 * per_epoch)
    steps = _train(nn.Linear(4, 1), n_batches * BATCH, DPSpec(sigma, 1.0, ledger), epochs=2)
    assert steps == 2 * opacus_steps_per_epoch(n_batches)
    assert sum(s for _, _, s in ledger.accountant.history) == steps
    assert ledger.entries[-1].steps == steps and ledger.entries[-1].sample_rate == rate
    assert 0.99 < ledger.spent() <= 1.0 + 1e-9


def test_a_charge_that_does_not_fit_is_refused_before_any_step() -> None:
    ledger = PrivacyLedger(max_epsilon=1.0, delta=1e-5)
    module = nn.Linear(4, 1)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(BudgetExceededError, match="above its max epsilon"):
        _train(module, 930, DPSpec(0.5, 1.0, ledger), epochs=5)
    assert ledger.accountant.history == [] and ledger.entries == []
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert not module._forward_hooks and not module._backward_hooks  # nothing was wrapped


def _distance_after(mu: float, dp: bool) -> float:
    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    start = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    spec = DPSpec(1.0, 1.0, PrivacyLedger(max_epsilon=50.0, delta=1e-5)) if dp else None
    _train(module, 400, spec, epochs=3, mu=mu)
    return float((torch.cat([p.detach().flatten() for p in module.parameters()]) - start).norm())


@pytest.mark.parametrize("dp", [True, False], ids=["dp-sgd", "plain"])
def test_the_proximal_term_pulls_local_weights_towards_the_global_ones(dp: bool) -> None:
    free, pulled = _distance_after(0.0, dp), _distance_after(10.0, dp)
    # Under DP-SGD the optimizer overwrites p.grad with the noised sum: a proximal term added to
    # the loss would be clipped away; applied after the noise it still pulls hard.
    assert pulled < 0.6 * free, (free, pulled)


def test_the_proximal_pull_costs_no_epsilon() -> None:
    charged = []
    for mu in (0.0, 5.0):
        ledger = PrivacyLedger(max_epsilon=50.0, delta=1e-5)
        _train(nn.Linear(4, 1), 400, DPSpec(1.0, 1.0, ledger), mu=mu)
        charged.append(ledger.spent())
    assert charged[0] == charged[1] > 0


def _largest_clipped_norm(*, full_precision: bool) -> float:
    """The largest norm of one clipped record's gradient, over records whose gradients came out of a
    bf16 forward pass (as under CUDA autocast), clipping norm 1."""
    from opacus.optimizers import DPOptimizer

    from privacy.dp_training import clip_in_full_precision

    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(512))
    optimizer = DPOptimizer(
        torch.optim.SGD([param], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1
    )
    if full_precision:
        clip_in_full_precision(optimizer)
    largest = 0.0
    for _ in range(200):
        param.grad_sample = (10 * torch.randn(1, 512, generator=generator)).to(torch.bfloat16)
        param.summed_grad = None
        optimizer.clip_and_accumulate()
        largest = max(largest, float(param.summed_grad.norm()))
    return largest


def test_bf16_record_gradients_are_clipped_within_the_clipping_norm() -> None:
    # Opacus alone takes the norms in bf16, and some clipped records come out above the norm:
    # the noise would then not cover one record's sensitivity.
    assert _largest_clipped_norm(full_precision=False) > 1.001
    assert _largest_clipped_norm(full_precision=True) <= 1.0 + 1e-6
