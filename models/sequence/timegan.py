"""Conditional TimeGAN (Yoon et al. 2019) for the daily wearable weeks, DP-SGD on every record reader."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import ndtri

from models.base import FitReport, LocalData, LocalRound, ModelKind
from models.encoder import EncoderError, TabularEncoder
from models.releases.sequence import SEQUENCE_MOMENTS
from models.risk.features import label_slice
from models.sequence.encoder import SequenceEncoder
from models.sequence.moments import SequenceMoments
from models.sequence.networks import RecurrentNet
from models.sequence.phases import PhaseTraining
from privacy.dp_training import DPSpec
from privacy.facade import prepare_module

PHASES = ("embedding", "supervised", "joint")
# Public stand-in conditions keep numeric (probit) entries where the encoder can put them:
# it clips quantiles to (1e-6, 1 - 1e-6) before the probit.
_Z_LIMIT = float(ndtri(1 - 1e-6))


class TimeGAN(PhaseTraining):
    """Conditional TimeGAN for the schema's daily channels, conditioned on the encoded static profile.

    Privacy: embedder (with its link prior), recovery, supervisor and discriminator read real
    weeks (or their embeddings) and are trained only by DP-SGD. The generator never touches a
    real record: it learns through the DP-trained discriminator, supervisor, recovery and link
    prior on stand-in profiles (the DP static generator's samples, or public marginals), against
    DP moments, so its updates are post-processing and use a plain optimizer. The same
    post-processing losses also tune the recovery in the joint phase (`tune_recovery`).

    Sampling goes generator -> recovery by default (`through_supervisor`): under DP the weak
    supervisor collapsed the generated spread. The link between profile and week comes from two
    DP sources: the embedder's prior head (profile -> expected weekly channel means, trained in
    the embedding and supervised phases inside the same DP-SGD steps) and the discriminator, which
    also sees each real week paired with a stand-in profile (not a record's) as a fake.
    """

    registry_name = "timegan"
    kind: ClassVar[ModelKind] = ModelKind.SEQUENCE_GENERATOR
    releases: ClassVar[tuple[str, ...]] = (SEQUENCE_MOMENTS,)  # the moments loss's DP target
    phases: ClassVar[tuple[str, ...]] = PHASES
    _MODULES: ClassVar[tuple[str, ...]] = ("embedder", "recovery", "supervisor", "generator", "discriminator")
    _SAMPLER: ClassVar[tuple[str, ...]] = ("generator", "supervisor", "recovery")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        hidden_dim: int = Field(default=24, ge=2, le=512)
        num_layers: int = Field(default=2, ge=1, le=4)
        noise_dim: int = Field(default=8, ge=1, le=256)
        # Noise entries drawn once per week and repeated every day: a patient-level random effect
        # (how this person differs from others with the same profile) that the generator need not
        # build by integrating daily noise. 0: daily noise only (the paper).
        week_noise_dim: int = Field(default=4, ge=0, le=256)
        learning_rate: float = Field(default=1e-3, gt=0, le=1)
        discriminator_lr: float = Field(default=1e-3, gt=0, le=1)
        generator_steps: int = Field(default=2, ge=1, le=100)
        # Stand-in profiles per generator step; None: the DP batch size. No record is in them, so
        # a larger batch costs CPU time only, and steadies the batch covariances of the moments loss.
        generator_batch_size: int | None = Field(default=None, ge=2, le=4096)
        # Generator Adam learning rate; None: learning_rate. The generator's update is
        # post-processing (no real record reaches it), so its steps cost no privacy budget.
        generator_lr: float | None = Field(default=None, gt=0, le=1)
        # Weight of D's verdict on the generator's raw latents (TimeGAN's gamma).
        gamma: float = Field(default=1.0, ge=0)
        # Weight of the next-day consistency of generated latents under the DP-trained supervisor.
        # 10 (the paper) pinned the generated latents to the weak DP supervisor's fixed point.
        supervised_weight: float = Field(default=1.0, ge=0)
        # Weight of the per-(day, channel) |mean| + |std| gap (TimeGAN's moments loss).
        moments_weight: float = Field(default=10.0, ge=0)
        # Sample through generator -> supervisor -> recovery (the paper) or generator -> recovery.
        # Under DP the supervisor is a weak, contractive map: going through it shrank the spread of
        # the generated latents about 20-fold, which the recovery shrank again (collapsed weeks).
        # Without it the supervisor still shapes the dynamics through the supervised loss.
        through_supervisor: bool = False
        # Let the joint phase's generator losses also tune the recovery (decoder). Post-processing:
        # no real record reaches those losses, only DP-trained modules and the DP moments. The
        # DP-trained recovery decodes real latents to smooth weeks; frozen, it capped the generated
        # day-to-day spread (within sd 0.034 for a target 0.049).
        tune_recovery: bool = True
        # Weight of the link prior's error in the per-record DP loss of the embedding and supervised
        # phases (both errors in sd units). Clipping bounds the whole record's gradient, so this
        # splits it between the autoencoder (or supervisor) and the prior.
        prior_weight: float = Field(default=1.0, ge=0)
        # Weight of |weekly channel means - DP prior(profile)| in the generator's loss.
        link_weight: float = Field(default=20.0, ge=0)
        # Weight of the mismatched pairs in D's loss: a record's real week paired with a public
        # stand-in profile, labelled fake, so D judges whether a week fits its profile.
        mismatch_weight: float = Field(default=1.0, ge=0)
        # Sigma / sensitivity of the local noisy-moments release under DP when no moments are given.
        moments_noise_multiplier: float = Field(default=10.0, gt=0)
        # Whether the weeks are conditioned on the label column too. Conditioned on it under DP, the
        # generated weeks told the label apart better than real weeks do, and risk models trained on
        # the synthetic cohort trusted that link on real patients (figures: README, risk models).
        label_in_condition: bool = False

    def __init__(self, encoder: TabularEncoder, config: Config | dict, *, seed: int = 0):
        self.encoder = encoder
        self.sequence = SequenceEncoder.from_schema(encoder.schema)
        self.config = config if isinstance(config, self.Config) else self.Config(**config)
        self.cond_dim = encoder.width
        c, h, layers = self.sequence.n_channels, self.config.hidden_dim, self.config.num_layers
        torch.manual_seed(seed)
        # nn.GRU has no per-sample gradients; prepare_module swaps it for Opacus's DPGRU (same
        # state_dict keys) in every module that goes through DP-SGD.
        self.embedder = prepare_module(
            RecurrentNet(c, self.cond_dim, h, h, layers, sigmoid=True, prior_dim=c)
        )
        self.recovery = prepare_module(RecurrentNet(h, 0, h, c, layers, sigmoid=True))
        self.supervisor = prepare_module(RecurrentNet(h, 0, h, h, max(1, layers - 1), sigmoid=True))
        self.discriminator = prepare_module(RecurrentNet(h, self.cond_dim, h, 1, layers, sigmoid=False))
        # The generator is never privatised, so it keeps the fast (cuDNN) nn.GRU.
        # Linear output head: a sigmoid here saturated and collapsed the generated weeks (the
        # DP-trained supervisor and recovery take any real-valued latent).
        # Its input each day: noise plus the day's one-hot position (public), so day-of-week
        # effects (weekend sleep, stress) need not be inferred by counting steps; without it the
        # generated weekend shift of sleep was 0.00 where real weeks have +0.05.
        length = self.sequence.length
        self.generator = RecurrentNet(
            self.config.noise_dim + self.config.week_noise_dim + length,
            self.cond_dim,
            h,
            h,
            layers,
            sigmoid=False,
        )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the federation averages (all five networks)."""
        state = {
            f"{name}.{k}": v for name in self._MODULES for k, v in getattr(self, name).state_dict().items()
        }
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def sampler_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what sampling needs: generator -> supervisor -> recovery."""
        return {k: v for k, v in self.state_dict().items() if k.partition(".")[0] in self._SAMPLER}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """All five networks (`strict`), or any of them whole."""
        parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self._MODULES}
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise KeyError(f"unexpected state key '{key}'")
            parts[prefix][rest] = value
        missing = [name for name, part in parts.items() if not part]
        if strict and missing:
            raise KeyError(f"state has no weights for the {missing[0]}")
        # Every given network checked before any is loaded: a bad state changes nothing.
        for name, part in parts.items():
            own = getattr(self, name).state_dict()
            if part and set(part) != set(own):
                raise KeyError(f"the {name}'s weights differ in keys: {sorted(set(part) ^ set(own))[:3]}")
            for key, value in part.items():
                if tuple(value.shape) != tuple(own[key].shape):
                    raise ValueError(
                        f"{name}.{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
                    )
        for name, part in parts.items():
            if part:
                getattr(self, name).load_state_dict(part, strict=True)

    # ---------------------------------------------------------------- conditions
    def condition(self, cond: np.ndarray) -> np.ndarray:
        """The condition vectors the networks see: the label's block zeroed unless `label_in_condition`."""
        if self.config.label_in_condition:
            return cond
        cond = np.array(cond, dtype=np.float32, copy=True)
        cond[:, label_slice(self.encoder)] = 0.0
        return cond

    def public_conditions(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Stand-in static profiles from public knowledge only: each categorical block drawn from
        its DP marginal, each numeric entry from N(0, 1) (the encoder maps the DP marginals to it).
        """
        cond = np.zeros((n, self.cond_dim), dtype=np.float32)
        for block in self.encoder.blocks:
            if block.kind == "categorical":
                picks = rng.choice(block.width, size=n, p=self.encoder.marginal(block.name))
                cond[np.arange(n), block.start + picks] = 1.0
            else:
                cond[:, block.start] = np.clip(rng.standard_normal(n), -_Z_LIMIT, _Z_LIMIT)
        return cond

    def stand_in_conditions(self, n: int, rng: np.random.Generator, pool: np.ndarray | None) -> np.ndarray:
        """Profiles for the generator's steps and D's mismatched pairs: rows drawn from `pool`
        (encoded profiles sampled from the DP-trained static generator, so post-processing) when
        given, else `public_conditions`.

        Public stand-ins have independent columns; real profiles do not (depression, anxiety and
        stress move together), so a generator taught on them linked weeks to profiles too strongly
        once fed the static generator's realistic ones (anxiety~resting_hr r 0.83, real 0.67).
        """
        if pool is None:
            return self.condition(self.public_conditions(n, rng))
        return self.condition(pool[rng.integers(0, len(pool), n)])

    def _noise(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The generator's input per day: Gaussian daily noise, the week's noise (the same every
        day) and the day's one-hot; shape (n, length, noise_dim + week_noise_dim + length)."""
        length = self.sequence.length
        noise = torch.randn((n, length, self.config.noise_dim), generator=generator)
        week = torch.randn((n, 1, self.config.week_noise_dim), generator=generator).expand(-1, length, -1)
        days = torch.eye(length).expand(n, -1, -1)
        return torch.cat([noise, week, days], dim=-1).to(device)

    # ---------------------------------------------------------------- training
    def fit_round(self, data: LocalData, plan: LocalRound) -> FitReport:
        """One federated round of `plan.phase` on the members' weeks, conditioned on their profiles."""
        if data.weeks is None:
            raise EncoderError("the schema declares no sequence, but a sequence model was asked for")
        return self.fit(
            data.weeks,
            data.profiles,
            phase=plan.phase,
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            dp=plan.dp,
            device=plan.device,
            seed=plan.seed,
            moments=plan.statistics.get(SEQUENCE_MOMENTS),
            stand_ins=plan.stand_ins,
            proximal_mu=plan.proximal_mu,
        )

    def fit(
        self,
        data: np.ndarray,
        cond: np.ndarray,
        *,
        phase: str,
        epochs: int,
        batch_size: int,
        dp: DPSpec | None,
        device: torch.device,
        seed: int,
        moments: SequenceMoments | None = None,
        stand_ins: np.ndarray | None = None,
        proximal_mu: float = 0.0,
    ) -> FitReport:
        """One local training pass of a phase: "embedding", "supervised" or "joint".

        `stand_ins`: encoded profiles from the DP static generator for the joint phase's
        generator (see `stand_in_conditions`); the other phases do not use them.
        """
        kwargs = {
            "epochs": epochs,
            "batch_size": batch_size,
            "dp": dp,
            "device": device,
            "seed": seed,
            "proximal_mu": proximal_mu,
        }
        if phase == "embedding":
            return self.fit_embedding(data, cond, moments=moments, **kwargs)
        if phase == "supervised":
            return self.fit_supervised(data, cond, moments=moments, **kwargs)
        if phase == "joint":
            return self.fit_joint(data, cond, moments=moments, stand_ins=stand_ins, **kwargs)
        raise ValueError(f"unknown TimeGAN phase {phase!r}; expected one of {PHASES}")

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_encoded(self, cond: np.ndarray, *, seed: int, batch_size: int = 1000) -> np.ndarray:
        """One scaled week (length, channels) in [0, 1] per given condition vector."""
        if cond.ndim != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond must have shape (n, {self.cond_dim}), got {cond.shape}")
        cond = self.condition(cond)
        noise_gen = torch.Generator().manual_seed(seed)
        cpu = torch.device("cpu")
        modules = (self.generator, self.supervisor, self.recovery)
        for module in modules:
            module.eval()
        chunks = []
        for start in range(0, len(cond), batch_size):
            c = torch.from_numpy(cond[start : start + batch_size].astype(np.float32))
            e_hat = self.generator(self._noise(len(c), noise_gen, cpu), c)
            latent = self.supervisor(e_hat) if self.config.through_supervisor else e_hat
            chunks.append(self.recovery(latent).numpy())
        for module in modules:
            module.train()
        if not chunks:
            return np.zeros((0, self.sequence.length, self.sequence.n_channels), np.float32)
        return np.concatenate(chunks).astype(np.float32)

    def sample(self, static: pd.DataFrame | np.ndarray, *, seed: int) -> pd.DataFrame:
        """Long-format weeks, one per synthetic patient, each generated for that patient's profile.

        `static`: synthetic static rows (with the id column when they have ids) or their
        encoded condition vectors.
        """
        if isinstance(static, pd.DataFrame):
            cond = self.encoder.transform(static)
            ids = static[self.sequence.id_column].tolist() if self.sequence.id_column in static else None
        else:
            cond, ids = np.asarray(static, dtype=np.float32), None
        return self.sequence.inverse_transform(self.sample_encoded(cond, seed=seed), ids)
