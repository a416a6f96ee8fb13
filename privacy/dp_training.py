"""One DP-SGD session for every model: budget check at Opacus's real figures, wrap, charge, unwrap."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn, optim
from torch.utils.data import DataLoader

from privacy.facade import make_private, opacus_steps_per_epoch
from privacy.ledger import PrivacyLedger


@dataclass
class DPSpec:
    """How a record-seeing module is privatised: sigma, clipping norm (L2), and whose ledger pays."""

    noise_multiplier: float
    clipping_norm: float
    ledger: PrivacyLedger
    label: str = "dp-sgd"


@dataclass
class TrainingSession:
    """What the training loop uses inside `dp_training`; after the block, `module` is the plain one."""

    module: nn.Module
    optimizer: optim.Optimizer
    data_loader: DataLoader
    steps: int = 0  # DP-SGD steps charged in this session (0 without DP)


def add_proximal_pull(optimizer: optim.Optimizer, anchors: Sequence[torch.Tensor], mu: float) -> None:
    """FedProx's proximal term mu/2 ||w - w_global||^2, added to the gradient right before the step.

    Opacus's DPOptimizer overwrites `p.grad` with the clipped, noised per-record sum, so a term
    added to the loss would be clipped with the data or lost. The pull mu (w - w_global) does not
    depend on any record: adding it after the noise is post-processing and costs no epsilon.
    `anchors` are the global weights, one per parameter of the optimizer, in its order.
    """
    if mu <= 0:
        return
    inner = getattr(optimizer, "original_optimizer", optimizer)  # DPOptimizer calls the inner step
    params = [p for group in inner.param_groups for p in group["params"]]
    if len(params) != len(anchors):
        raise ValueError(f"{len(anchors)} proximal anchors for {len(params)} parameters")
    plain_step: Callable[..., object] = inner.step

    def step_with_pull(*args: object, **kwargs: object) -> object:
        with torch.no_grad():
            for param, anchor in zip(params, anchors, strict=True):
                if param.grad is not None:
                    param.grad.add_(param.detach() - anchor.to(param.device), alpha=mu)
        return plain_step(*args, **kwargs)

    inner.step = step_with_pull  # type: ignore[method-assign]


def clip_in_full_precision(optimizer: optim.Optimizer) -> None:
    """Per-record gradients cast to the parameters' dtype before Opacus clips them.

    Under bf16 autocast the per-record gradients come out in bf16, and Opacus computes their
    norms before casting: a norm with bf16's 8-bit mantissa may be low by about 0.4%, so a
    clipped gradient could exceed the clipping norm and the noise would no longer cover one
    record's sensitivity. Norms of fp32 copies are exact for those values.
    """
    clip_and_accumulate: Callable[[], object] = optimizer.clip_and_accumulate  # type: ignore[attr-defined]

    def clip_fp32() -> object:
        for param in optimizer.params:  # type: ignore[attr-defined]
            samples = getattr(param, "grad_sample", None)
            if isinstance(samples, torch.Tensor) and samples.dtype != param.dtype:
                param.grad_sample = samples.to(param.dtype)
            elif isinstance(samples, list):
                param.grad_sample = [s.to(param.dtype) for s in samples]
        return clip_and_accumulate()

    optimizer.clip_and_accumulate = clip_fp32  # type: ignore[attr-defined]


@contextlib.contextmanager
def dp_training(
    *,
    module: nn.Module,
    optimizer: optim.Optimizer,
    data_loader: DataLoader,
    dp: DPSpec | None,
    epochs: int,
    what: str | None = None,
    proximal_mu: float = 0.0,
) -> Iterator[TrainingSession]:
    """Train `module` with DP-SGD under `dp` (plain training when None) for `epochs` epochs.

    Before anything runs, the ledger checks the charge at the sample rate and step count Opacus
    will really use (BudgetExceededError, nothing wrapped). Opacus's accountant is the ledger's,
    so every optimizer step is charged as it happens; on leaving the block the steps are logged
    under `what`, the hooks removed and per-sample gradients cleared, and `session.module` is the
    plain module whose weights the federation averages.

    Args:
        data_loader: a plain loader over the members; under DP it is replaced by Opacus's
            Poisson-sampled one (losses must be summed over the batch: loss_reduction="sum").
        proximal_mu: FedProx's weight; the pull towards the weights the module has now (the
            global ones) is applied after the noise (see `add_proximal_pull`).
    """
    anchors = [p.detach().clone() for p in module.parameters()]
    if dp is None:
        add_proximal_pull(optimizer, anchors, proximal_mu)
        yield TrainingSession(module, optimizer, data_loader)
        return
    label = what or dp.label
    per_epoch = opacus_steps_per_epoch(len(data_loader))
    sample_rate = 1.0 / per_epoch
    dp.ledger.check(
        label, noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=epochs * per_epoch
    )
    private = make_private(
        module=module,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=dp.noise_multiplier,
        clipping_norm=dp.clipping_norm,
        ledger=dp.ledger,
    )
    add_proximal_pull(private.optimizer, anchors, proximal_mu)
    clip_in_full_precision(private.optimizer)
    session = TrainingSession(private.module, private.optimizer, private.data_loader)
    before = _accounted_steps(dp.ledger)
    try:
        yield session
    finally:
        session.steps = _accounted_steps(dp.ledger) - before
        dp.ledger.record_training(
            label, noise_multiplier=dp.noise_multiplier, sample_rate=private.sample_rate, steps=session.steps
        )
        session.module = unwrap(private.module)


@contextlib.contextmanager
def through_private(discriminator: nn.Module, optimizer: optim.Optimizer) -> Iterator[None]:
    """A generator's post-processing step through a DP-trained module: its per-sample hooks are
    off (it is not updated here), and the gradients this pass leaves in it are dropped after."""
    hooks = hasattr(discriminator, "disable_hooks")
    if hooks:
        discriminator.disable_hooks()  # type: ignore[operator]
    try:
        yield
    finally:
        optimizer.zero_grad(set_to_none=True)
        if hooks:
            discriminator.enable_hooks()  # type: ignore[operator]


def _accounted_steps(ledger: PrivacyLedger) -> int:
    return sum(int(steps) for _, _, steps in ledger.accountant.history)


def unwrap(private_module: nn.Module) -> nn.Module:
    """Drop Opacus's hooks and per-sample buffers; return the plain module."""
    private_module.remove_hooks()  # type: ignore[operator]
    plain: nn.Module = private_module._module  # type: ignore[assignment]
    for p in plain.parameters():
        p.grad, p.grad_sample = None, None
        if hasattr(p, "summed_grad"):
            p.summed_grad = None
    return plain
