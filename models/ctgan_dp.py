"""DP-CTGAN: ctgan's conditional generator and discriminator, with DP-SGD on the discriminator."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from ctgan.synthesizers.ctgan import Discriminator, Generator
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from models.base import FitReport, LocalData, LocalRound, ModelKind
from models.encoder import EncoderError, TabularEncoder
from models.numeric_moments import numeric_correlations
from models.pairs import PAIR_SEPARATOR
from models.releases.numeric import NUMERIC_MOMENTS
from models.runtime import autocast_for
from privacy.dp_training import DPSpec, add_proximal_pull, dp_training, through_private
from privacy.facade import prepare_module

logger = logging.getLogger(__name__)

# ctgan's Gumbel-softmax temperature for one-hot outputs.
_GUMBEL_TAU = 0.2


class DPCTGAN:
    """Conditional tabular GAN (CTGAN-style) whose only record-seeing module is DP-trained.

    The generator never touches real rows: it learns through the DP discriminator's output,
    so its updates are post-processing and need no noise of their own.
    """

    registry_name = "dp-ctgan"
    kind = ModelKind.FEDERATED_GENERATOR
    releases = (NUMERIC_MOMENTS,)  # its pair loss follows the DP numeric moments
    phases = ()

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        embedding_dim: int = Field(default=64, ge=2, le=1024)
        generator_dims: tuple[int, ...] = (128, 128)
        discriminator_dims: tuple[int, ...] = (128, 128)
        generator_lr: float = Field(default=2e-4, gt=0, le=1)
        discriminator_lr: float = Field(default=2e-4, gt=0, le=1)
        generator_steps: int = Field(default=1, ge=1, le=10)
        # Weight of the 1-D Wasserstein pull of each numeric output towards N(0, 1): the
        # encoder maps the DP marginals to N(0, 1), so this uses DP outputs only.
        marginal_weight: float = Field(default=1.0, ge=0)
        # Weight of |batch correlation - target| over the numeric column pairs given to fit() as
        # `pair_targets` (r from the DP numeric moments of the handshake: post-processing). Under DP-SGD
        # the discriminator's noisy verdict kept the columns' shapes but lost how they go together
        # (demo: depression~anxiety r 0.17, anxiety~stress -0.32; real 0.63, 0.58).
        pair_weight: float = Field(default=1.0, ge=0)

    def __init__(self, encoder: TabularEncoder, config: Config | dict, *, seed: int = 0):
        self.encoder = encoder
        self.config = config if isinstance(config, self.Config) else self.Config(**config)
        self._blocks = encoder.categorical_blocks()
        self._cond_offsets = np.cumsum([0] + [b.width for b in self._blocks[:-1]]).tolist()
        self.cond_dim = sum(b.width for b in self._blocks)
        numeric = [b for b in encoder.blocks if b.kind == "numeric"]
        self._numeric_columns = [b.start for b in numeric]
        self._numeric_index = {b.name: i for i, b in enumerate(numeric)}  # name -> position among them
        self._pair_target: tuple[torch.Tensor, torch.Tensor] | None = None
        torch.manual_seed(seed)
        self.generator = Generator(
            self.config.embedding_dim + self.cond_dim, self.config.generator_dims, encoder.width
        )
        # pac=1: packing several records into one discriminator input would let one gradient
        # depend on several patients and break per-record clipping.
        self.discriminator = prepare_module(
            Discriminator(encoder.width + self.cond_dim, self.config.discriminator_dims, pac=1)
        )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the federation averages (generator and discriminator)."""
        state = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        state.update({f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()})
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def sampler_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what sampling needs: the exported bundle carries no discriminator."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("generator.")}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        parts: dict[str, dict[str, torch.Tensor]] = {"generator": {}, "discriminator": {}}
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise KeyError(f"unexpected state key '{key}'")
            parts[prefix][rest] = value
        self.generator.load_state_dict(parts["generator"], strict=True)
        if parts["discriminator"] or strict:
            self.discriminator.load_state_dict(parts["discriminator"], strict=strict)

    # ---------------------------------------------------------------- conditioning
    def _random_condition(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Pick a categorical column uniformly, then a category from its DP marginal."""
        cond = np.zeros((n, self.cond_dim), dtype=np.float32)
        chosen = rng.integers(0, len(self._blocks), size=n)
        categories = np.empty(n, dtype=np.int64)
        for j, block in enumerate(self._blocks):
            rows = np.flatnonzero(chosen == j)
            categories[rows] = rng.choice(block.width, size=len(rows), p=self.encoder.marginal(block.name))
            cond[rows, self._cond_offsets[j] + categories[rows]] = 1.0
        return cond, chosen

    def _real_condition(self, real: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """For real rows, condition on the row's own category in a uniformly chosen column."""
        cond = torch.zeros(real.shape[0], self.cond_dim, device=real.device)
        if real.shape[0] == 0:
            return cond
        chosen = torch.randint(0, len(self._blocks), (real.shape[0],), generator=generator)
        for j, block in enumerate(self._blocks):
            rows = (chosen == j).nonzero(as_tuple=True)[0].to(real.device)
            one_hot = real[rows, block.start : block.start + block.width]
            cond[rows, self._cond_offsets[j] : self._cond_offsets[j] + block.width] = one_hot
        return cond

    def _activate(self, raw: torch.Tensor) -> torch.Tensor:
        """Identity on numeric (probit) outputs, Gumbel-softmax on each one-hot block."""
        pieces = []
        for block in self.encoder.blocks:
            part = raw[:, block.start : block.start + block.width]
            pieces.append(F.gumbel_softmax(part, tau=_GUMBEL_TAU) if block.kind == "categorical" else part)
        return torch.cat(pieces, dim=1)

    def _condition_loss(self, raw: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Cross-entropy making the generated category match the condition (ctgan's cond loss)."""
        losses = []
        for j, block in enumerate(self._blocks):
            target = cond[:, self._cond_offsets[j] : self._cond_offsets[j] + block.width]
            mask = target.sum(dim=1) > 0
            if mask.any():
                logits = raw[mask, block.start : block.start + block.width]
                losses.append(F.cross_entropy(logits, target[mask].argmax(dim=1), reduction="sum"))
        return torch.stack(losses).sum() / max(1, raw.shape[0]) if losses else raw.sum() * 0

    def _pair_target_matrix(
        self, targets: dict[str, float] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(target r, mask) over the numeric outputs, from {"a|b": r}; None without targets."""
        if not targets:
            return None
        index = self._numeric_index
        k = len(index)
        target, mask = torch.zeros(k, k), torch.zeros(k, k)
        for key, r in targets.items():
            a, _, b = key.partition(PAIR_SEPARATOR)
            if a not in index or b not in index or not -1.0 <= float(r) <= 1.0:
                raise EncoderError(f"pair target '{key}': not a numeric column pair with r in [-1, 1]")
            target[index[a], index[b]] = target[index[b], index[a]] = float(r)
            mask[index[a], index[b]] = 1.0
        return target, mask

    def _pair_loss(self, raw: torch.Tensor) -> torch.Tensor:
        """Mean |batch r - target r| over the target pairs of numeric outputs."""
        if self._pair_target is None or raw.shape[0] < 3:
            return raw.sum() * 0
        target, mask = (t.to(raw.device) for t in self._pair_target)
        x = raw[:, self._numeric_columns]
        x = (x - x.mean(dim=0)) / (x.std(dim=0) + 1e-6)
        r = x.T @ x / (x.shape[0] - 1)
        return ((r - target).abs() * mask).sum() / mask.sum()

    def _marginal_loss(self, raw: torch.Tensor) -> torch.Tensor:
        """Sorted numeric outputs vs standard-normal quantiles (1-D Wasserstein-2 per column)."""
        if not self._numeric_columns or raw.shape[0] < 2:
            return raw.sum() * 0
        n = raw.shape[0]
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        target = torch.special.ndtri(levels).to(raw.device, torch.float32)
        ordered, _ = torch.sort(raw[:, self._numeric_columns], dim=0)
        return ((ordered - target[:, None]) ** 2).mean()

    # ---------------------------------------------------------------- training
    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        """One federated round: `fit` on the members' profiles, pair targets from the DP moments."""
        products = plan.statistics.get(NUMERIC_MOMENTS)
        return self.fit(
            data.profiles,
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            dp=plan.dp,
            device=plan.device,
            seed=plan.seed,
            pair_targets=None if products is None else numeric_correlations(products, self.encoder.schema),
            proximal_mu=plan.proximal_mu,
        )

    def fit(
        self,
        data: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        dp: DPSpec | None,
        device: torch.device,
        seed: int,
        pair_targets: dict[str, float] | None = None,
        proximal_mu: float = 0.0,
    ) -> FitReport:
        """Local training on encoded rows; DP-SGD on the discriminator when `dp` is given.

        `pair_targets`: {"a|b": r} on the numeric columns' probit outputs (see `pair_weight`).
        """
        torch.manual_seed(seed)
        self._pair_target = self._pair_target_matrix(pair_targets)
        rng = np.random.default_rng(seed)
        cond_rng = torch.Generator().manual_seed(seed)
        generator = self.generator.to(device).train()
        discriminator: nn.Module = self.discriminator.to(device).train()
        opt_g = torch.optim.Adam(generator.parameters(), lr=self.config.generator_lr, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(
            discriminator.parameters(), lr=self.config.discriminator_lr, betas=(0.5, 0.9)
        )
        loader = DataLoader(TensorDataset(torch.from_numpy(data)), batch_size=batch_size)
        report = FitReport()
        with dp_training(
            module=discriminator,
            optimizer=opt_d,
            data_loader=loader,
            dp=dp,
            epochs=epochs,
            proximal_mu=proximal_mu,
        ) as session:
            add_proximal_pull(opt_g, [p.detach().clone() for p in generator.parameters()], proximal_mu)
            for _ in range(epochs):
                for (real,) in session.data_loader:
                    real = real.to(device)
                    report.discriminator_loss_sum += self._discriminator_step(
                        session.module, session.optimizer, real, batch_size, rng, cond_rng, device
                    )
                    for _ in range(self.config.generator_steps):
                        report.generator_loss_sum += self._generator_step(
                            session.module, opt_g, session.optimizer, batch_size, rng, device
                        )
                    report.steps += 1
                    report.records_seen += real.shape[0]
        # The plain module (hooks off): the federation averages its weights.
        self.discriminator = session.module
        self.generator, self.discriminator = generator.cpu(), self.discriminator.cpu()
        return report

    def _fake_batch(self, n: int, rng: np.random.Generator, device: torch.device):
        cond_np, _ = self._random_condition(n, rng)
        cond = torch.from_numpy(cond_np).to(device)
        noise = torch.randn(n, self.config.embedding_dim, device=device)
        raw = self.generator(torch.cat([noise, cond], dim=1))
        return raw, cond

    def _discriminator_step(self, discriminator, opt_d, real, n_fake, rng, cond_rng, device) -> float:
        opt_d.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast_for(device):
            raw, fake_cond = self._fake_batch(n_fake, rng, device)
            fake = self._activate(raw).float()
        real_cond = self._real_condition(real, cond_rng)
        inputs = torch.cat([torch.cat([real, real_cond], 1), torch.cat([fake, fake_cond], 1)])
        labels = torch.cat([torch.ones(real.shape[0]), torch.zeros(n_fake)]).to(device)
        # One forward, one backward per DP step; losses summed per record (Opacus loss_reduction="sum").
        with autocast_for(device):
            logits = discriminator(inputs).squeeze(1).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        loss.backward()
        opt_d.step()
        return float(loss.detach()) / max(1, inputs.shape[0])

    def _generator_step(self, discriminator, opt_g, opt_d, n, rng, device) -> float:
        with through_private(discriminator, opt_d):
            opt_g.zero_grad(set_to_none=True)
            with autocast_for(device):
                raw, cond = self._fake_batch(n, rng, device)
                logits = discriminator(torch.cat([self._activate(raw), cond], 1)).squeeze(1).float()
            loss = (
                F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
                + self._condition_loss(raw.float(), cond)
                + self.config.marginal_weight * self._marginal_loss(raw.float())
                + self.config.pair_weight * self._pair_loss(raw.float())
            )
            loss.backward()
            opt_g.step()
        return float(loss.detach())

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_encoded(self, n: int, *, seed: int, batch_size: int = 1000) -> np.ndarray:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.generator.eval()
        chunks = []
        for start in range(0, n, batch_size):
            raw, _ = self._fake_batch(min(batch_size, n - start), rng, torch.device("cpu"))
            chunks.append(self._activate(raw).numpy())
        self.generator.train()
        return np.concatenate(chunks) if chunks else np.zeros((0, self.encoder.width), np.float32)

    def sample(self, n: int, *, seed: int) -> pd.DataFrame:
        """`n` synthetic rows in the schema's types (categorical cells sampled, not argmaxed)."""
        return self.encoder.inverse_transform(self.sample_encoded(n, seed=seed))
