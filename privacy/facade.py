"""One keyword-only facade over Opacus: Poisson-sampled DP-SGD charged to a hospital's ledger."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn, optim
from torch.utils.data import DataLoader

from models.statistics import Histograms
from privacy.ledger import PrivacyLedger

logger = logging.getLogger(__name__)


@dataclass
class PrivateTraining:
    """The DP-wrapped module, optimizer and Poisson data loader, plus the sampling figures."""

    module: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader
    sample_rate: float
    noise_multiplier: float


def prepare_module(module: nn.Module) -> nn.Module:
    """Swap layers Opacus cannot handle per sample (BatchNorm, LSTM, MHA) for DP variants.

    Call before building the optimizer: fixing replaces modules and so their parameters.
    """
    fixed = ModuleValidator.fix(module)
    ModuleValidator.validate(fixed, strict=True)
    return fixed


def opacus_steps_per_epoch(n_batches: int) -> int:
    """Batches Opacus's DPDataLoader really draws per epoch for a loader of `n_batches` batches.

    Opacus samples at q = 1 / n_batches and its DPDataLoader draws int(1 / q) batches, which is
    n_batches - 1 for some sizes (93, 99, 105, ...) through floating point; its accountant then
    charges every step at 1 / len(DPDataLoader). Budget checks and noise calibration must use
    these figures, or the ledger is charged for other steps than were checked (k = 93: 92 steps
    at q = 1/92 where 93 at 1/93 were checked).
    """
    return int(1 / (1 / n_batches))


def planned_steps(n_records: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, DP-SGD steps per epoch) that Opacus's accountant will charge for this many records."""
    steps = opacus_steps_per_epoch(max(1, math.ceil(n_records / batch_size)))
    return 1.0 / steps, steps


def steps_per_epoch(n_records: int, batch_size: int) -> int:
    """DP-SGD steps Opacus takes per epoch over `n_records` (see `opacus_steps_per_epoch`)."""
    return planned_steps(n_records, batch_size)[1]


def make_private(
    *,
    module: nn.Module,
    optimizer: optim.Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    clipping_norm: float,
    ledger: PrivacyLedger,
    grad_sample_mode: str = "hooks",
) -> PrivateTraining:
    """Wrap for DP-SGD with Poisson sampling; every optimizer step is counted on `ledger`.

    Losses must be summed over the batch (loss_reduction="sum"); Opacus then clips each
    record's gradient to `clipping_norm` (L2) and adds N(0, (sigma * clipping_norm)^2) noise.
    `grad_sample_mode` is Opacus's way of computing per-record gradients ("hooks", "functorch",
    "ew"; all exact); `benchmarks/dp_step.py` times them. Ghost clipping ("ghost") needs a
    per-record loss criterion that the models' own training loops do not take, so it is refused.
    """
    if "ghost" in grad_sample_mode:
        raise ValueError("ghost clipping needs Opacus's criterion wrapper; the models sum their own losses")
    with warnings.catch_warnings():
        # secure_mode off: simulation seeds its noise on purpose (see client.node.NodeSettings).
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")
        engine = PrivacyEngine(accountant="rdp")
        # Share the hospital's accountant: Opacus's own step hook then charges the ledger, so the
        # epsilon we report is exactly the accountant's figure, composed with earlier charges.
        engine.accountant = ledger.accountant
        private_module, private_optimizer, private_loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clipping_norm,
            poisson_sampling=True,
            loss_reduction="sum",
            grad_sample_mode=grad_sample_mode,
        )
    return PrivateTraining(
        module=private_module,
        optimizer=private_optimizer,
        data_loader=private_loader,
        sample_rate=1.0 / len(private_loader),  # what Opacus's accountant hook charges
        noise_multiplier=noise_multiplier,
    )


def gaussian_noise_multiplier(*, epsilon: float, delta: float) -> float:
    """Noise multiplier of one Gaussian release that costs `epsilon` at `delta` under RDP."""
    probe = PrivacyLedger(max_epsilon=epsilon, delta=delta)
    return probe.calibrate_noise_multiplier(target_epsilon=epsilon, sample_rate=1.0, steps=1)


def release_noisy_histograms(
    counts: Histograms,
    *,
    ledger: PrivacyLedger,
    rng: np.random.Generator,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    what: str = "handshake histograms",
) -> Histograms:
    """Gaussian mechanism on all histograms at once, charged to the ledger under `what`.

    Give either the release's `epsilon` (at the ledger's delta) or its noise multiplier.
    Adding or removing one patient changes one cell of each column's histogram by 1, so the
    L2 sensitivity of the whole release is sqrt(number of columns).
    """
    if (epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of epsilon or noise_multiplier")
    z = (
        noise_multiplier
        if noise_multiplier is not None
        else gaussian_noise_multiplier(
            epsilon=epsilon,
            delta=ledger.delta,  # type: ignore[arg-type]
        )
    )
    ledger.check(what, noise_multiplier=z, sample_rate=1.0, steps=1)
    sigma = z * math.sqrt(len(counts))
    noisy = {name: c + rng.normal(0.0, sigma, size=c.shape) for name, c in counts.items()}
    ledger.charge_gaussian(what, noise_multiplier=z)
    logger.info("released %d noisy histograms (sigma=%.2f counts)", len(counts), sigma)
    return noisy
