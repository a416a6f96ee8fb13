"""Per-hospital privacy ledger: one Opacus RDP accountant composing every charge of a run."""

from __future__ import annotations

import copy
import json
import math
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from pydantic import BaseModel, Field

from privacy.storage import atomic_write_text

# RDP orders: Opacus's defaults stop at 63, too low for small epsilons (a 0.5-epsilon Gaussian
# release is tightest near order 100); more orders only ever tighten the (epsilon, delta) bound.
RDP_ORDERS: list[float] = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 129, 4), *range(136, 513, 16)]
# Noise multipliers (sigma / L2 sensitivity) searched when calibrating DP-SGD to a budget.
_SIGMA_LOW, _SIGMA_HIGH = 0.3, 200.0


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at every order. Cached: a ledger's history repeats the same few (sigma, q)
    pairs, and calibration asks for epsilon dozens of times over the same history."""
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS
    )
    rdp.setflags(write=False)
    return rdp


def _epsilon(accountant: RDPAccountant, delta: float) -> float:
    """Opacus's RDPAccountant.get_privacy_spent over RDP_ORDERS, the same sum term for term."""
    if not accountant.history:
        return 0.0
    rdp = sum(_rdp_per_step(float(sigma), float(rate)) * steps for sigma, rate, steps in accountant.history)
    with warnings.catch_warnings():
        # Calibration probes extreme sigmas whose best order is the largest; the bound stays valid.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


def rounds_noise(rho: float, weight: float) -> float:
    """Noise multiplier of a Gaussian release given share `weight` of a zCDP budget rho: rho_r =
    1 / (2 z^2) for a release of L2 sensitivity 1, so z = 1 / sqrt(2 weight rho)."""
    return 1.0 / math.sqrt(2.0 * weight * rho)


class BudgetExceededError(RuntimeError):
    """A charge would take a hospital past its own max epsilon; nothing was run."""


class LedgerEntry(BaseModel):
    """One charge: what was released, the mechanism's parameters, and epsilon after it."""

    what: str
    mechanism: str  # "gaussian" (statistics) or "dp-sgd" (model training)
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    epsilon_after: float = Field(ge=0)


class PrivacyLedger:
    """Every charge of one hospital, composed by a single RDP accountant (epsilon at `delta`).

    The accountant's history is the ground truth: epsilon is always recomputed from it, so a
    restored ledger reports exactly the figure Opacus would.
    """

    def __init__(
        self,
        *,
        max_epsilon: float,
        delta: float,
        history: list[tuple[float, float, int]] | None = None,
        entries: list[LedgerEntry] | None = None,
    ):
        self.max_epsilon = max_epsilon
        self.delta = delta
        self.accountant = RDPAccountant()
        self.accountant.history = [tuple(step) for step in (history or [])]
        self.entries: list[LedgerEntry] = list(entries or [])

    # ---------------------------------------------------------------- figures
    def spent(self) -> float:
        return _epsilon(self.accountant, self.delta)

    def remaining(self) -> float:
        return max(0.0, self.max_epsilon - self.spent())

    def epsilon_if(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after a further `steps` of the subsampled Gaussian mechanism (nothing charged)."""
        trial = RDPAccountant()
        trial.history = copy.deepcopy(self.accountant.history)
        if steps > 0:
            trial.history.append((noise_multiplier, sample_rate, steps))
        return _epsilon(trial, self.delta)

    def epsilon_if_releases(self, noise_multipliers: list[float]) -> float:
        """Epsilon after one further Gaussian release at each noise multiplier (nothing charged)."""
        trial = RDPAccountant()
        trial.history = [*copy.deepcopy(self.accountant.history), *((z, 1.0, 1) for z in noise_multipliers)]
        return _epsilon(trial, self.delta)

    def calibrate_gaussian_rounds(self, *, target_epsilon: float, weights: list[float]) -> float:
        """The largest zCDP budget rho whose releases, round r at noise multiplier
        `rounds_noise(rho, w_r)`, keep total epsilon at or below the target (the weights split rho)."""
        target = min(target_epsilon, self.max_epsilon)

        def fits(log_rho: float) -> bool:
            sigmas = [rounds_noise(math.exp(log_rho), w) for w in weights]
            return self.epsilon_if_releases(sigmas) <= target

        low, high = math.log(1e-8), math.log(1e4)
        if not fits(low):
            raise BudgetExceededError(
                f"refused: {len(weights)} Gaussian releases cannot fit in the remaining budget "
                f"(spent {self.spent():.3f} of max epsilon {self.max_epsilon:g})"
            )
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return math.exp(low)

    def check(self, what: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise BudgetExceededError unless the planned charge fits; return epsilon after it."""
        after = self.epsilon_if(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if after > self.max_epsilon + 1e-9:
            raise BudgetExceededError(
                f"refused: {what} would raise this hospital's epsilon from {self.spent():.3f} to "
                f"{after:.3f}, above its max epsilon {self.max_epsilon:g} (delta={self.delta:g})"
            )
        return after

    # ---------------------------------------------------------------- charges
    def charge_gaussian(self, what: str, *, noise_multiplier: float) -> LedgerEntry:
        """Charge one release of the (unsampled) Gaussian mechanism, e.g. noisy histograms."""
        self.check(what, noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
        return self._log(what, "gaussian", noise_multiplier, 1.0, 1)

    def record_training(
        self, what: str, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> LedgerEntry:
        """Log DP-SGD steps that Opacus already counted on `self.accountant` through its hook."""
        return self._log(what, "dp-sgd", noise_multiplier, sample_rate, steps)

    def _log(self, what: str, mechanism: str, sigma: float, rate: float, steps: int) -> LedgerEntry:
        entry = LedgerEntry(
            what=what,
            mechanism=mechanism,
            noise_multiplier=sigma,
            sample_rate=rate,
            steps=steps,
            epsilon_after=self.spent(),
        )
        self.entries.append(entry)
        return entry

    def calibrate_noise_multiplier(self, *, target_epsilon: float, sample_rate: float, steps: int) -> float:
        """Smallest noise multiplier whose `steps` keep total epsilon at or below the target."""
        target = min(target_epsilon, self.max_epsilon)

        def fits(sigma: float) -> bool:
            return self.epsilon_if(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps) <= target

        if not fits(_SIGMA_HIGH):
            raise BudgetExceededError(
                f"refused: {steps} DP-SGD steps at sample rate {sample_rate:.4f} cannot fit in the "
                f"remaining budget (spent {self.spent():.3f} of max epsilon {self.max_epsilon:g})"
            )
        low, high = _SIGMA_LOW, _SIGMA_HIGH
        if fits(low):
            return low
        for _ in range(40):  # bisection to ~1e-10 relative width: plenty for sigma
            mid = (low + high) / 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        return high

    # ---------------------------------------------------------------- persistence
    def to_json(self) -> str:
        return json.dumps(
            {
                "max_epsilon": self.max_epsilon,
                "delta": self.delta,
                "history": [list(step) for step in self.accountant.history],
                "entries": [entry.model_dump() for entry in self.entries],
            }
        )

    @classmethod
    def from_json(cls, text: str, *, max_epsilon: float, delta: float) -> PrivacyLedger:
        """Restore; the caller's (node-owned) max epsilon and delta win over stored ones."""
        data = json.loads(text)
        if data["delta"] != delta:
            raise ValueError(
                f"stored ledger was kept at delta={data['delta']:g}, node asks for {delta:g}: "
                "epsilon figures at different deltas cannot be composed"
            )
        return cls(
            max_epsilon=max_epsilon,
            delta=delta,
            history=[tuple(step) for step in data["history"]],
            entries=[LedgerEntry.model_validate(e) for e in data["entries"]],
        )

    def save(self, path: Path) -> None:
        """Atomic write: a crash mid-write leaves the previous ledger file intact."""
        atomic_write_text(path, self.to_json())
