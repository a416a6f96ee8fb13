"""HHG: coarse cells from a marginal-based model, within-bin values from a VAE, latent DDPM and refiner."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.base import FitReport, LocalData, LocalRound, ModelKind
from models.encoder import EncoderError, TabularEncoder
from models.hhg.fine import FineLayout, decoded_rows, from_probit, independent_cells
from models.hhg.networks import VAE, Denoiser, Discriminator, Refiner, cosine_alpha_bars, ddpm_sample
from models.hhg.training import PhaseTraining
from models.pgm.domain import to_cells
from models.registry import get_model_class
from privacy.dp_training import DPSpec
from privacy.facade import prepare_module

PHASES = ("vae", "diffusion", "refine")
COARSE_PREFIX = "coarse"


class HybridGenerator(PhaseTraining):
    """Hierarchical hybrid generator: coarse to fine.

    Coarse: each row's public cells (categories, numeric bins) come from an attached static model
    (`attach_coarse`, in the run the DP marginal-based PrivatePGM), else column by column from the
    encoder's DP one-way marginals. Fine: where a numeric bin holds more than one value, the row's
    position inside it is modelled given all its cells: a VAE, a DDPM on the VAE's latents and a GAN
    refiner of the decoded values. Every value lands inside the bin the coarse model drew.

    Training: phases "vae", "diffusion", "refine" in that order, each its own DP-SGD session and
    charge; without a phase (the contract's `fit`, a stage's "" phase) the three record readers train
    together in one session, each record's gradient through all of them clipped as one.

    Privacy: the VAE, the denoiser and the discriminator read members' rows (or their latents) and
    are trained only with DP-SGD; the refiner learns only through the DP discriminator
    (post-processing). Fake rows' cells come from the server's stand-in profiles or the DP
    marginals, never from a member (see `fake_cells`).
    """

    registry_name = "hhg"
    kind: ClassVar[ModelKind] = ModelKind.FEDERATED_GENERATOR
    releases: ClassVar[tuple[str, ...]] = ()
    phases: ClassVar[tuple[str, ...]] = PHASES
    # In a plan it may follow a static generator, whose cells it refines (`attach_coarse`); the
    # server sends that model's samples as stand-ins for the discriminator's fake rows.
    refines_coarse: ClassVar[bool] = True
    _NETWORKS: ClassVar[tuple[str, ...]] = ("vae", "denoiser", "refiner", "discriminator")
    _SAMPLER: ClassVar[tuple[str, ...]] = ("vae", "denoiser", "refiner")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        latent_dim: int = Field(default=16, ge=1, le=256)
        hidden_dim: int = Field(default=64, ge=2, le=1024)
        diffusion_steps: int = Field(default=40, ge=2, le=1000)
        vae_lr: float = Field(default=1e-3, gt=0, le=1)
        diffusion_lr: float = Field(default=1e-3, gt=0, le=1)
        discriminator_lr: float = Field(default=2e-4, gt=0, le=1)
        refiner_lr: float = Field(default=2e-4, gt=0, le=1)
        # Weight of the KL term in the VAE's per-record loss (1: the ELBO).
        kl_weight: float = Field(default=1.0, ge=0, le=100)
        # Weight of |R(x) - x|^2 in the refiner's loss: keeps it a small correction of the decoded
        # values rather than a generator of its own against a noisy (DP) discriminator.
        refiner_weight: float = Field(default=1.0, ge=0, le=1000)
        refiner_steps: int = Field(default=1, ge=1, le=10)  # refiner updates per discriminator step
        # The ablation: decode z ~ N(0, I) ("vae"), decode DDPM latents ("diffusion"), or refine
        # the decoded values too ("full").
        sample_with: Literal["vae", "diffusion", "full"] = "full"
        # The attached coarse model (set by `attach_coarse`), so a bundle or audit reload can rebuild it.
        coarse_model: str = ""
        coarse_config: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, encoder: TabularEncoder, config: Config | dict, *, seed: int = 0):
        self.encoder = encoder
        self.config = config if isinstance(config, self.Config) else self.Config(**config)
        self.layout = FineLayout(encoder.schema)
        if not self.layout.fine:
            raise EncoderError("hhg: no numeric column has a bin holding more than one value")
        f, c, h = self.layout.fine_dim, self.layout.cond_dim, self.config.hidden_dim
        latent, steps = self.config.latent_dim, self.config.diffusion_steps
        torch.manual_seed(seed)
        self.vae = prepare_module(VAE(f, c, latent, h))
        self.denoiser = prepare_module(Denoiser(latent, c, h, steps))
        self.discriminator = prepare_module(Discriminator(f, c, h))
        self.refiner = Refiner(f, c, h)  # never reads a record: post-processing of D's verdicts
        self.alpha_bars = cosine_alpha_bars(steps)
        self.coarse: Any = None
        if self.config.coarse_model:
            self.coarse = get_model_class(self.config.coarse_model)(encoder, self.config.coarse_config)

    def attach_coarse(self, model: Any) -> None:
        """Draw coarse cells from `model` (a fitted static generator on the same encoder)."""
        if model.encoder.schema.schema_hash() != self.encoder.schema.schema_hash():
            raise EncoderError("hhg: the coarse model was built for another schema")
        self.coarse = model
        self.config = self.config.model_copy(
            update={
                "coarse_model": model.registry_name,
                "coarse_config": model.config.model_dump(mode="json"),
            }
        )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every network, and the coarse model's sampler state when one is attached."""
        state = {
            f"{name}.{k}": v for name in self._NETWORKS for k, v in getattr(self, name).state_dict().items()
        }
        if self.coarse is not None:
            state.update({f"{COARSE_PREFIX}.{k}": v for k, v in self.coarse.sampler_state_dict().items()})
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def sampler_state_dict(self) -> dict[str, torch.Tensor]:
        """What sampling needs: everything but the discriminator."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("discriminator.")}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """The networks (all of them when `strict`) and the coarse model's state, if it has one."""
        parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in (*self._NETWORKS, COARSE_PREFIX)}
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise KeyError(f"unexpected state key '{key}'")
            parts[prefix][rest] = value
        if parts[COARSE_PREFIX] and not self.config.coarse_model:
            raise KeyError("hhg: state has a coarse model, but the config names none (coarse_model)")
        if strict and self.config.coarse_model and not parts[COARSE_PREFIX]:
            raise KeyError(f"hhg: state has no weights for the coarse model '{self.config.coarse_model}'")
        coarse = self.coarse
        if parts[COARSE_PREFIX]:  # rebuilt and checked before any network changes
            coarse = get_model_class(self.config.coarse_model)(self.encoder, self.config.coarse_config)
            coarse.load_state_dict(parts[COARSE_PREFIX], strict=True)
        for name in self._NETWORKS:
            if parts[name] or strict or name in self._SAMPLER:
                getattr(self, name).load_state_dict(parts[name], strict=True)
        self.coarse = coarse

    # ---------------------------------------------------------------- coarse cells
    def coarse_cells(self, n: int, *, seed: int, label_shares: dict[str, float] | None = None) -> np.ndarray:
        """(n, columns) cells from the coarse model, else from the DP one-way marginals."""
        if self.coarse is None:
            return independent_cells(self.encoder, n, np.random.default_rng(seed), label_shares)
        if label_shares:
            if "label_shares" not in inspect.signature(self.coarse.sample).parameters:
                raise EncoderError(
                    f"hhg: the coarse model '{self.coarse.registry_name}' cannot sample by label"
                )
            frame = self.coarse.sample(n, seed=seed, label_shares=label_shares)
        else:
            frame = self.coarse.sample(n, seed=seed)
        return to_cells(frame, self.encoder.schema)

    def stand_in_cells(self, stand_ins: np.ndarray | None) -> np.ndarray | None:
        """Cells of the server's stand-in profiles (samples of the DP coarse model), if sent."""
        if stand_ins is None:
            return None
        if stand_ins.ndim != 2 or stand_ins.shape[1] != self.encoder.width or not len(stand_ins):
            raise EncoderError(
                f"stand-ins must have shape (n > 0, {self.encoder.width}), got {stand_ins.shape}"
            )
        return to_cells(decoded_rows(self.encoder, stand_ins), self.encoder.schema)

    def fake_cells(self, n: int, rng: np.random.Generator, pool: np.ndarray | None) -> np.ndarray:
        """Cells for fake rows: drawn from the stand-ins' cells, else from the DP marginals.

        Never a member's cells: a fake built on a record's cells would make that record reach a
        second per-sample gradient (its fake's) in the same step, beyond what clipping bounds.
        """
        if pool is None:
            return independent_cells(self.encoder, n, rng)
        return pool[rng.integers(0, len(pool), n)]

    # ---------------------------------------------------------------- training
    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        """One federated round of `plan.phase` ("" trains the three networks jointly) on the members."""
        return self.fit(
            data.profiles,
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            dp=plan.dp,
            device=plan.device,
            seed=plan.seed,
            phase=plan.phase or None,
            stand_ins=plan.stand_ins,
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
        phase: str | None = None,
        stand_ins: np.ndarray | None = None,
        proximal_mu: float = 0.0,
        pair_targets: dict[str, float] | None = None,
    ) -> FitReport:
        """Local training on encoded profiles: one phase, or (None) all networks in one DP session.

        `pair_targets` is taken for the table models' interface and unused: the pairs' structure
        is the coarse model's.
        """
        del pair_targets
        if phase not in (None, *PHASES):
            raise ValueError(f"unknown hhg phase {phase!r}; expected one of {PHASES}")
        plan = LocalRound(epochs, batch_size, dp, device, seed, proximal_mu, phase or "", stand_ins=stand_ins)
        return self.train_phase(data, plan)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_positions(self, cells: np.ndarray, *, seed: int, sample_with: str | None = None) -> np.ndarray:
        """(rows, fine_dim) within-bin positions for the given cells (`sample_with` as the config's)."""
        mode = sample_with or self.config.sample_with
        if mode not in ("vae", "diffusion", "full"):
            raise ValueError(f"unknown sample_with {mode!r}")
        generator = torch.Generator().manual_seed(seed)
        cond = torch.from_numpy(self.layout.condition(cells))
        if mode == "vae":
            z = torch.randn((len(cells), self.config.latent_dim), generator=generator)
        else:
            z = ddpm_sample(self.denoiser, cond, self.config.latent_dim, self.alpha_bars, generator)
        mean, log_var = self.vae.decode(z, cond)
        fine = mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape, generator=generator)
        if mode == "full":
            fine = self.refiner(fine, cond)
        return from_probit(fine.numpy())

    def sample(self, n: int, *, seed: int, label_shares: dict[str, float] | None = None) -> pd.DataFrame:
        """`n` rows in the schema's types: coarse cells, then values inside each cell's bin."""
        cells = self.coarse_cells(n, seed=seed, label_shares=label_shares)
        return self.layout.values(cells, self.sample_positions(cells, seed=seed))
