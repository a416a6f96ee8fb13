"""HHG's training: one DP-SGD session per phase (VAE, latent diffusion, refine) or all jointly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from models.base import FitReport, LocalRound
from models.encoder import TabularEncoder
from models.hhg.fine import FineLayout, decoded_rows, to_probit
from models.hhg.networks import ddpm_sample, noised
from models.runtime import autocast_for
from privacy.dp_training import add_proximal_pull, dp_training, through_private


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Per-record BCE of D on (real row i, fake row i) pairs.

    Each record is paired with one fake as a single (2, d) input, so per-sample gradients stay one
    per record (the fake depends on no record) and share the batch dimension with other networks.
    """
    logits = discriminator(torch.stack([real, fake], dim=1))  # (rows, 2)
    return F.softplus(-logits[:, 0]) + F.softplus(logits[:, 1])


class _Joint(nn.Module):
    """VAE, denoiser and discriminator as one module: one DP optimizer, one charge, each record's
    gradient through all three clipped together (the single-session form of the three phases)."""

    def __init__(self, vae: nn.Module, denoiser: nn.Module, discriminator: nn.Module):
        super().__init__()
        self.vae, self.denoiser, self.discriminator = vae, denoiser, discriminator


class PhaseTraining:
    """The phases as methods of `HybridGenerator` (which provides what the annotations name)."""

    config: Any
    encoder: TabularEncoder
    layout: FineLayout
    vae: nn.Module
    denoiser: nn.Module
    discriminator: nn.Module
    refiner: nn.Module
    alpha_bars: torch.Tensor
    stand_in_cells: Callable[[np.ndarray | None], np.ndarray | None]
    fake_cells: Callable[[int, np.random.Generator, np.ndarray | None], np.ndarray]

    def members(self, data: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Members' fine probits (integers spread over their value's slot) and cells' one-hot."""
        cells, positions = self.layout.cells_and_positions(decoded_rows(self.encoder, data), rng)
        return to_probit(positions).astype(np.float32), self.layout.condition(cells)

    def train_phase(self, data: np.ndarray, plan: LocalRound) -> FitReport:
        """Train `plan.phase`'s record-reading network(s) with DP-SGD under `plan.dp`."""
        torch.manual_seed(plan.seed)
        rng = np.random.default_rng(plan.seed)
        fine, cond = self.members(data, rng)
        loader = DataLoader(
            TensorDataset(torch.from_numpy(fine), torch.from_numpy(cond)),
            batch_size=plan.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(plan.seed),
        )
        device, phase = plan.device, plan.phase
        for name in ("vae", "denoiser", "discriminator", "refiner"):
            setattr(self, name, getattr(self, name).to(device).train())
        parts = _PhaseLosses(self, rng, torch.Generator().manual_seed(plan.seed), plan)
        modules = {"vae": self.vae, "diffusion": self.denoiser, "refine": self.discriminator}
        module = modules.get(phase) or _Joint(self.vae, self.denoiser, self.discriminator)
        opt_r = torch.optim.Adam(self.refiner.parameters(), lr=self.config.refiner_lr, betas=(0.5, 0.9))
        add_proximal_pull(opt_r, [p.detach().clone() for p in self.refiner.parameters()], plan.proximal_mu)
        frozen = [
            m for name, m in (("vae", self.vae), ("diffusion", self.denoiser)) if phase not in ("", name)
        ]
        report, sums = FitReport(), {}
        what = f"{plan.dp.label} ({phase or 'joint'} phase)" if plan.dp else None
        with (
            _frozen(*frozen),
            dp_training(
                module=module,
                optimizer=self._phase_optimizer(phase, module),
                data_loader=loader,
                dp=plan.dp,
                epochs=plan.epochs,
                what=what,
                proximal_mu=plan.proximal_mu,
            ) as session,
        ):
            for _ in range(plan.epochs):
                for x, c in session.data_loader:
                    x, c = x.to(device), c.to(device)
                    session.optimizer.zero_grad(set_to_none=True)
                    with autocast_for(device):
                        losses = parts.of(phase, session.module, x, c)
                    # Summed over records: Opacus clips each record's gradient (loss_reduction="sum").
                    torch.stack([loss.float() for loss in losses.values()]).sum().backward()
                    session.optimizer.step()
                    for name, loss in losses.items():
                        sums[name] = sums.get(name, 0.0) + (float(loss.detach().mean()) if len(x) else 0.0)
                    if phase in ("refine", ""):
                        for _ in range(self.config.refiner_steps):
                            report.generator_loss_sum += self._refiner_step(
                                session.module, session.optimizer, opt_r, parts.fakes, plan.batch_size, device
                            )
                    report.steps += 1
                    report.records_seen += len(x)
        self._put_back(session.module, phase)
        report.discriminator_loss_sum = sums.get("discriminator", 0.0)
        report.extra.update({f"{k}-loss-sum": v for k, v in sums.items() if k != "discriminator"})
        return report

    def _phase_optimizer(self, phase: str, module: nn.Module) -> torch.optim.Optimizer:
        """Adam over the phase's network; jointly, one optimizer in which each keeps its own rate."""
        rates = {"vae": self.config.vae_lr, "diffusion": self.config.diffusion_lr}
        if phase:
            return torch.optim.Adam(module.parameters(), lr=rates.get(phase, self.config.discriminator_lr))
        groups = [
            {"params": self.vae.parameters(), "lr": self.config.vae_lr},
            {"params": self.denoiser.parameters(), "lr": self.config.diffusion_lr},
            {"params": self.discriminator.parameters(), "lr": self.config.discriminator_lr},
        ]
        return torch.optim.Adam(groups)

    def _put_back(self, plain: nn.Module, phase: str) -> None:
        """The trained plain module(s) (Opacus unwrapped) in their places, every network on the CPU."""
        if phase == "":
            assert isinstance(plain, _Joint)
            self.vae, self.denoiser, self.discriminator = plain.vae, plain.denoiser, plain.discriminator
        else:
            setattr(self, {"vae": "vae", "diffusion": "denoiser", "refine": "discriminator"}[phase], plain)
        for name in ("vae", "denoiser", "discriminator", "refiner"):
            setattr(self, name, getattr(self, name).cpu())

    def _refiner_step(
        self,
        private: nn.Module,
        opt_d: torch.optim.Optimizer,
        opt_r: torch.optim.Optimizer,
        fakes: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        n: int,
        device: torch.device,
    ) -> float:
        """One refiner update through the DP discriminator's verdict (post-processing, no record)."""
        with through_private(private, opt_d):
            opt_r.zero_grad(set_to_none=True)
            fine, cond = fakes(n)
            with autocast_for(device):
                refined = self.refiner(fine, cond)
                logits = self.discriminator(torch.cat([refined, cond], dim=1)).float()
            loss = F.softplus(-logits).mean() + self.config.refiner_weight * ((refined - fine) ** 2).mean()
            loss.backward()
            opt_r.step()
        return float(loss.detach())


class _PhaseLosses:
    """Each phase's per-record losses for one local round, and the fake rows they share."""

    def __init__(self, model: Any, rng: np.random.Generator, noise: torch.Generator, plan: LocalRound):
        self.model, self.rng, self.noise, self.device = model, rng, noise, plan.device
        self.pool = model.stand_in_cells(plan.stand_ins)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.noise).to(self.device)

    def fakes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded fine probits of DDPM latents for public cells, and those cells' one-hot."""
        m = self.model
        fake_cond = torch.from_numpy(m.layout.condition(m.fake_cells(n, self.rng, self.pool))).to(self.device)
        with torch.no_grad():
            z = ddpm_sample(m.denoiser, fake_cond, m.config.latent_dim, m.alpha_bars, self.noise)
            with autocast_for(self.device):
                mean, log_var = m.vae.decode(z, fake_cond)
            return mean + torch.exp(0.5 * log_var) * self.randn(*mean.shape), fake_cond

    def vae_part(self, vae: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        nll, kl = vae(x, c, self.randn(len(x), self.model.config.latent_dim))
        return nll + self.model.config.kl_weight * kl

    def diffusion_part(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.model
        # Latents of the members under the current (DP-trained) encoder: each depends on one
        # record only. Posterior samples rather than means: the decoder was taught on those.
        with torch.no_grad():
            mean, log_var = m.vae.encode(x, c)
            z0 = mean + torch.exp(0.5 * log_var) * self.randn(*mean.shape)
        t = torch.randint(0, len(m.alpha_bars), (len(x),), generator=self.noise).to(self.device)
        eps = self.randn(*z0.shape)
        predicted = m.denoiser(noised(z0, t, eps, m.alpha_bars), t, c).float()
        return ((predicted - eps) ** 2).sum(dim=1)

    def refine_part(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        fake, fake_cond = self.fakes(len(x))
        with torch.no_grad():
            fake = self.model.refiner(fake, fake_cond)
        real_rows, fake_rows = torch.cat([x, c], dim=1), torch.cat([fake, fake_cond], dim=1)
        return discriminator_loss(self.model.discriminator, real_rows, fake_rows)

    def of(self, phase: str, module: nn.Module, x: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """The phase's losses by network; jointly ("") all three, each record's summed."""
        if phase == "vae":
            return {"vae": self.vae_part(module, x, c)}
        if phase == "diffusion":
            return {"diffusion": self.diffusion_part(x, c)}
        if phase == "refine":
            return {"discriminator": self.refine_part(x, c)}
        return {
            "vae": self.vae_part(self.model.vae, x, c),
            "diffusion": self.diffusion_part(x, c),
            "discriminator": self.refine_part(x, c),
        }


class _frozen:
    """No gradients into these modules while they only feed another's loss (restored after)."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self.flags: list[list[bool]] = []

    def __enter__(self) -> None:
        self.flags = [[p.requires_grad for p in m.parameters()] for m in self.modules]
        for module in self.modules:
            module.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for module, saved in zip(self.modules, self.flags, strict=True):
            for p, flag in zip(module.parameters(), saved, strict=True):
                p.requires_grad_(flag)
