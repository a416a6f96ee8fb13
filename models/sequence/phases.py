"""TimeGAN's three training phases (embedding, supervised, joint): DP-SGD on every record reader."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from models.base import FitReport
from models.runtime import autocast_for
from models.sequence.encoder import SequenceEncoder
from models.sequence.losses import (
    _channel_scale,
    _link_loss,
    _moments_loss,
    _per_record_bce,
    _prior_loss,
    _reconstruction_and_prior_loss,
)
from models.sequence.moments import MOMENT_BLOCKS, SequenceMoments, release_noisy_moments
from models.sequence.networks import _AutoEncoder, _frozen, _SupervisorAndPrior
from models.sequence.stand_ins import checked_stand_ins
from privacy.dp_training import DPSpec, add_proximal_pull, dp_training, through_private
from privacy.facade import opacus_steps_per_epoch
from privacy.ledger import PrivacyLedger

logger = logging.getLogger(__name__)


class PhaseTraining:
    """The phases as methods of the model (`TimeGAN` mixes this in): each trains some of its networks.

    The model provides what the annotations below name: its config, sequence encoder, condition
    width, the five networks, the generator's noise and the stand-in profiles.
    """

    config: Any
    sequence: SequenceEncoder
    cond_dim: int
    embedder: nn.Module
    recovery: nn.Module
    supervisor: nn.Module
    generator: nn.Module
    discriminator: nn.Module
    _noise: Callable[[int, torch.Generator, torch.device], torch.Tensor]
    stand_in_conditions: Callable[[int, np.random.Generator, np.ndarray | None], np.ndarray]
    condition: Callable[[np.ndarray], np.ndarray]

    def _loader(self, data: np.ndarray, cond: np.ndarray, batch_size: int, seed: int) -> DataLoader:
        """Weeks and their static conditions in one dataset, so Poisson sampling draws them together."""
        if data.shape[1:] != (self.sequence.length, self.sequence.n_channels):
            raise ValueError(f"data shape {data.shape} does not fit the schema's sequence")
        if cond.shape != (len(data), self.cond_dim):
            raise ValueError(f"cond shape {cond.shape} != ({len(data)}, {self.cond_dim})")
        x = torch.from_numpy(np.clip(data, 0.0, 1.0).astype(np.float32))
        c = torch.from_numpy(self.condition(cond).astype(np.float32))
        return DataLoader(
            TensorDataset(x, c),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )

    def _train_per_record(
        self,
        module: nn.Module,
        loader: DataLoader,
        phase: str,
        *,
        epochs: int,
        dp: DPSpec | None,
        device: torch.device,
        per_record_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        proximal_mu: float = 0.0,
    ) -> tuple[nn.Module, float, FitReport]:
        """One record-seeing module trained on per-record losses, DP-SGD under `dp`."""
        optimizer = torch.optim.Adam(module.parameters(), lr=self.config.learning_rate)
        what = f"{dp.label} ({phase} phase)" if dp else None
        report = FitReport()
        loss_sum = 0.0
        with dp_training(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            dp=dp,
            epochs=epochs,
            what=what,
            proximal_mu=proximal_mu,
        ) as session:
            for _ in range(epochs):
                for x, c in session.data_loader:
                    x, c = x.to(device), c.to(device)
                    session.optimizer.zero_grad(set_to_none=True)
                    with autocast_for(device):  # bf16 on CUDA; the loss itself in fp32
                        per_record = per_record_loss(session.module, x, c).float()
                    # Summed over records: Opacus clips each record's gradient (loss_reduction="sum").
                    per_record.sum().backward()
                    session.optimizer.step()
                    loss_sum += float(per_record.mean().detach()) if len(x) else 0.0
                    report.steps += 1
                    report.records_seen += len(x)
        return session.module, loss_sum, report

    def fit_embedding(
        self,
        data: np.ndarray,
        cond: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        dp: DPSpec | None,
        device: torch.device,
        seed: int,
        moments: SequenceMoments | None = None,
        proximal_mu: float = 0.0,
    ) -> FitReport:
        """Autoencoder phase: embedder + recovery learn to reconstruct real weeks (DP-SGD under dp)."""
        torch.manual_seed(seed)
        loader = self._loader(data, cond, batch_size, seed)
        scale = _channel_scale(moments, self.sequence.n_channels, device)
        module: nn.Module = _AutoEncoder(self.embedder, self.recovery).to(device).train()
        module, loss_sum, report = self._train_per_record(
            module,
            loader,
            "embedding",
            epochs=epochs,
            dp=dp,
            device=device,
            per_record_loss=lambda m, x, c: _reconstruction_and_prior_loss(
                m, x, c, self.config.prior_weight, scale
            ),
            proximal_mu=proximal_mu,
        )
        self.embedder, self.recovery = module.embedder.cpu(), module.recovery.cpu()
        report.extra["reconstruction-loss-sum"] = loss_sum
        return report

    def fit_supervised(
        self,
        data: np.ndarray,
        cond: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        dp: DPSpec | None,
        device: torch.device,
        seed: int,
        moments: SequenceMoments | None = None,
        proximal_mu: float = 0.0,
    ) -> FitReport:
        """Supervisor phase: predict tomorrow's embedding from the embedder's outputs on real weeks.

        The supervisor sees embeddings of real records, so it is DP-trained; the embedder is
        only evaluated here (its weights are already DP-trained and stay fixed).
        """
        torch.manual_seed(seed)
        loader = self._loader(data, cond, batch_size, seed)
        embedder = self.embedder.to(device).eval()
        scale = _channel_scale(moments, self.sequence.n_channels, device)
        # The embedder's link prior trains on in this phase: same records, same DP-SGD steps
        # (its gradient is clipped together with the supervisor's), no extra charge.
        module: nn.Module = _SupervisorAndPrior(self.supervisor, embedder.prior).to(device).train()

        def next_step_loss(m: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                h = embedder(x, c)
            h_next, prior = m(h, c)
            next_step = ((h_next[:, :-1] - h[:, 1:]) ** 2).mean(dim=(1, 2))
            return next_step + self.config.prior_weight * _prior_loss(prior, x, scale)

        module, loss_sum, report = self._train_per_record(
            module,
            loader,
            "supervised",
            epochs=epochs,
            dp=dp,
            device=device,
            per_record_loss=next_step_loss,
            proximal_mu=proximal_mu,
        )
        embedder.prior = module.prior
        self.supervisor, self.embedder = module.supervisor.cpu(), embedder.train().cpu()
        report.extra["supervised-loss-sum"] = loss_sum
        return report

    def fit_joint(
        self,
        data: np.ndarray,
        cond: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        dp: DPSpec | None,
        device: torch.device,
        seed: int,
        moments: SequenceMoments | None = None,
        stand_ins: np.ndarray | None = None,
        proximal_mu: float = 0.0,
    ) -> FitReport:
        """Adversarial phase: DP discriminator vs. a generator that learns only through DP modules.

        Embedder and supervisor stay fixed here (TimeGAN's joint refinement of the embedder would
        need another DP-SGD pass over the same records for little gain); the recovery is tuned by
        the generator's post-processing losses unless `tune_recovery` is off.
        """
        torch.manual_seed(seed)
        pool = None if stand_ins is None else checked_stand_ins(stand_ins, self.cond_dim)
        rng = np.random.default_rng(seed)
        noise_gen = torch.Generator().manual_seed(seed)
        loader = self._loader(data, cond, batch_size, seed)
        g_batch = self.config.generator_batch_size or batch_size
        what = f"{dp.label} (joint phase)" if dp else ""
        release = dp is not None and moments is None
        if release:
            assert dp is not None
            per_epoch = opacus_steps_per_epoch(len(loader))
            moments = self._release_moments(data, dp, what, per_epoch * epochs, 1 / per_epoch, rng)
        target = self._moment_target(moments, device)
        generator = self.generator.to(device).train()
        embedder, supervisor, recovery = (
            m.to(device).eval() for m in (self.embedder, self.supervisor, self.recovery)
        )
        discriminator: nn.Module = self.discriminator.to(device).train()
        tuned = [*generator.parameters(), *(recovery.parameters() if self.config.tune_recovery else ())]
        opt_g = torch.optim.Adam(tuned, lr=self.config.generator_lr or self.config.learning_rate)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=self.config.discriminator_lr)
        report = FitReport()
        moments_sum = 0.0
        prior = embedder.prior
        fixed = (embedder, supervisor) if self.config.tune_recovery else (embedder, supervisor, recovery)
        session_args = {"dp": dp, "epochs": epochs, "what": what or None, "proximal_mu": proximal_mu}
        with (
            _frozen(*fixed),
            dp_training(module=discriminator, optimizer=opt_d, data_loader=loader, **session_args) as session,
        ):
            add_proximal_pull(opt_g, [p.detach().clone() for p in tuned], proximal_mu)
            for _ in range(epochs):
                for x, c in session.data_loader:
                    x, c = x.to(device), c.to(device)
                    report.discriminator_loss_sum += self._discriminator_step(
                        session.module, session.optimizer, x, c, noise_gen, rng, pool
                    )
                    for _ in range(self.config.generator_steps):
                        g_cond, g_target = self._generator_inputs(x, c, target, dp, g_batch, rng, pool)
                        g_loss, m_loss = self._generator_step(
                            session.module, opt_g, session.optimizer, g_cond, g_target, noise_gen, prior
                        )
                        report.generator_loss_sum += g_loss
                        moments_sum += m_loss
                    report.steps += 1
                    report.records_seen += len(x)
        discriminator = session.module
        self.generator, self.discriminator = generator.cpu(), discriminator.cpu()
        self.embedder, self.supervisor, self.recovery = (
            m.train().cpu() for m in (embedder, supervisor, recovery)
        )
        report.extra["moments-loss-sum"] = moments_sum
        return report

    def _release_moments(
        self,
        data: np.ndarray,
        dp: DPSpec,
        what: str,
        steps: int,
        sample_rate: float,
        rng: np.random.Generator,
    ) -> SequenceMoments:
        """Noisy moments target for the joint phase under DP, released only if the phase fits.

        Why not the real batch's mean/std (the paper's moments loss)? They are an unnoised
        function of real rows steering the generator, which would void its post-processing
        argument; passing them through the DP embedder/recovery would not help either (the
        outputs are still per-batch functions of real rows). So the target is a Gaussian-mechanism
        release (six blocks, see `release_noisy_moments`), charged to the same ledger.
        Better still: the server merges such releases once and passes `moments` to every round.
        """
        z = self.config.moments_noise_multiplier
        blocks = len(MOMENT_BLOCKS)
        dp.ledger.check(f"{what} moments", noise_multiplier=z, sample_rate=1.0, steps=blocks)
        # Check the release and the DP-SGD steps together, so a refusal changes nothing.
        trial = PrivacyLedger(
            max_epsilon=dp.ledger.max_epsilon,
            delta=dp.ledger.delta,
            history=[*dp.ledger.accountant.history, (z, 1.0, blocks)],
        )
        trial.check(what, noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps)
        released = release_noisy_moments(
            data,
            ledger=dp.ledger,
            noise_multiplier=z,
            rng=rng,
            what=f"{what} moments",
            day_sd=self.sequence.day_sd,
            week_sd=self.sequence.week_sd,
        )
        logger.info("released noisy sequence moments (noise multiplier %.2f) for %s", z, what)
        return released

    def _generator_inputs(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        target: dict[str, torch.Tensor] | None,
        dp: DPSpec | None,
        batch_size: int,
        rng: np.random.Generator,
        pool: np.ndarray | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Conditions and moments target of a generator step.

        Without DP the generator may use the batch's own profiles and moments (the paper).
        Under DP neither may reach it: real profiles would make its update an unnoised function
        of records, so it gets stand-in profiles (`stand_in_conditions`) and the released (DP)
        moments target. The stand-ins cost no privacy, so their batch may be larger than D's.
        """
        if dp is None:
            batch = SequenceMoments.of(x.detach().cpu().numpy(), day_sd=self.sequence.day_sd)
            return c, target if target is not None else self._moment_target(batch, x.device)
        assert target is not None
        stand_ins = self.stand_in_conditions(batch_size, rng, pool)
        return torch.from_numpy(stand_ins).to(x.device), target

    @staticmethod
    def _moment_target(
        moments: SequenceMoments | None, device: torch.device
    ) -> dict[str, torch.Tensor] | None:
        if moments is None:
            return None
        return {key: torch.from_numpy(value).to(device) for key, value in moments.rhythm().items()}

    def _discriminator_step(
        self,
        discriminator: nn.Module,
        opt_d: torch.optim.Optimizer,
        x: torch.Tensor,
        c: torch.Tensor,
        noise_gen: torch.Generator,
        rng: np.random.Generator,
        pool: np.ndarray | None,
    ) -> float:
        """One DP step; record i's unit is its real week plus two fakes drawn for its profile, plus
        its real week paired with a stand-in profile (labelled fake).

        Opacus accumulates the per-sample gradients of the four D calls at index i, so clipping
        bounds record i's whole influence (its profile enters the fakes too). The mismatched pair
        uses a stand-in profile, not another record's: pairing with a batch neighbour's profile would
        put record j into record i's clipped unit and double j's sensitivity. That pair teaches D
        the conditional link, which is the only way the generator (fed stand-ins) learns it.
        """
        opt_d.zero_grad(set_to_none=True)
        c_pub = (
            torch.from_numpy(self.stand_in_conditions(len(x), rng, pool)).to(x.device)
            if self.config.mismatch_weight > 0
            else None
        )
        with autocast_for(x.device):  # bf16 on CUDA; the per-record loss in fp32
            with torch.no_grad():
                h_real = self.embedder(x, c)
                e_hat = self.generator(self._noise(len(x), noise_gen, x.device), c)
                h_hat = self.supervisor(e_hat) if self.config.through_supervisor else e_hat
            gamma = self.config.gamma if self.config.through_supervisor else 0.0
            mismatch = 0.0
            if c_pub is not None:
                mismatch = self.config.mismatch_weight * _per_record_bce(
                    discriminator(h_real, c_pub).squeeze(-1).float(), 0.0
                )
            per_record = (
                mismatch
                + _per_record_bce(discriminator(h_real, c).squeeze(-1).float(), 1.0)
                + _per_record_bce(discriminator(h_hat, c).squeeze(-1).float(), 0.0)
                + gamma * _per_record_bce(discriminator(e_hat, c).squeeze(-1).float(), 0.0)
            )
        per_record.sum().backward()
        opt_d.step()
        return float(per_record.mean().detach()) if len(x) else 0.0

    def _generator_step(
        self,
        discriminator: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        cond: torch.Tensor,
        target: dict[str, torch.Tensor],
        noise_gen: torch.Generator,
        prior: nn.Module,
    ) -> tuple[float, float]:
        """Post-processing update: every loss reaches real data only through DP-trained modules."""
        with through_private(discriminator, opt_d):
            opt_g.zero_grad(set_to_none=True)
            with autocast_for(cond.device):  # bf16 on CUDA; every loss below in fp32
                e_hat = self.generator(self._noise(len(cond), noise_gen, cond.device), cond)
                h_hat = self.supervisor(e_hat)
                latent = h_hat if self.config.through_supervisor else e_hat
                x_hat = self.recovery(latent).float()
                adversarial = _per_record_bce(discriminator(latent, cond).squeeze(-1).float(), 1.0).mean()
                adversarial_e = (
                    _per_record_bce(discriminator(e_hat, cond).squeeze(-1).float(), 1.0).mean()
                    if self.config.through_supervisor
                    else 0.0
                )
                # h_hat = S(e_hat) is the supervisor's next-day prediction: generated latents should
                # follow the dynamics the DP-trained supervisor learned from real embeddings.
                supervised = F.mse_loss(h_hat[:, :-1].float(), e_hat[:, 1:].float())
                # The link: for its (stand-in) profile a generated week's channel means should sit where
                # the DP-trained prior puts real weeks with that profile (post-processing of a DP module).
                with torch.no_grad():
                    expected = prior(cond).float()
                moments = _moments_loss(x_hat, target)
                link = _link_loss(x_hat.mean(dim=1) / target["sd"], expected / target["sd"], cond)
            loss = (
                self.config.link_weight * link
                + adversarial
                + self.config.gamma * adversarial_e
                + self.config.supervised_weight * supervised
                + self.config.moments_weight * moments
            )
            loss.backward()
            opt_g.step()
        return float(loss.detach()), float(moments.detach())
