"""Sums of scaled weeks that merge by adding, and their DP release: six blocks beside their sensitivities."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from privacy.ledger import PrivacyLedger

# Norm bounds of a record's contribution to each block of the DP release. Bounds at the worst case
# drown the spread in noise; clipping moves only the records past a bound, and the noise falls with
# it (the second-moment blocks: with its square), so the bounds sit near the tails. Measured on
# the demo cohort (quantiles 50 / 95 / 99%): |weekly means - 1/2| in shares of sqrt(channels) / 2:
# 0.43 / 0.57 / 0.63; day deviations, RMS per cell in declared day_sd units: 0.74 / 0.94 / 1.02;
# weekly means - centre, RMS per channel in declared week_sd units: 0.79 / 1.45 / 1.80.
MEAN_CLIP_SHARE = 0.65  # of sqrt(channels) / 2, the largest norm of weekly means - 1/2
DEVIATION_CLIP = 1.0  # RMS per (day, channel) cell, in day_sd units
BETWEEN_CLIP = 1.5  # RMS per channel, in week_sd units
# The Gaussian releases of `release_noisy_moments`, each a block with its own sensitivity.
MOMENT_BLOCKS = (
    "weekly means",
    "day deviations",
    "between weeks",
    "within weeks",
    "day by day",
    "level by day",
)


def _rhythm_terms(y: Any) -> tuple[Any, Any, Any, Any]:
    """Per week of y (n, length, channels), numpy or torch: the weekly mean m (n, channels), the
    deviations e = y - m (n, length, channels), their within-week products sum_t e_t e_t^T /
    length (n, channels, channels) and lag-1 products sum_t e_t * e_t+1 / length (n, channels).

    Without the cross-channel products the generator drove every channel from one shared daily
    factor (day-to-day r of sleep and stress -0.89, real -0.17); without the lag-1 term it made
    the deviations alternate. A recurrent classifier spots either at once.
    """
    week = y.mean(axis=1)
    e = y - week[:, None, :]
    length = y.shape[1]
    if isinstance(e, torch.Tensor):
        within = torch.einsum("ntc,ntd->ncd", e, e) / length
    else:
        within = np.einsum("ntc,ntd->ncd", e, e) / length
    return week, e, within, (e[:, :-1] * e[:, 1:]).sum(axis=1) / length


def _day_by_day(e: Any) -> Any:
    """Per week of the deviations e (n, length, channels): sum_c e_c e_c^T (n, length, length),
    how each day's deviation goes with every other day's, pooled over channels.

    Without it the generator's weeks had a start-up transient (day 1 deviations 1.5x the week's
    sd, mid-week 0.7x; real 1.1x and 0.95x) and too smooth a carry-over (resting_hr day 1 ~ day 2
    r 0.70, real 0.38): the classifier's main cue once levels and channel covariances matched.
    """
    if isinstance(e, torch.Tensor):
        return torch.einsum("ntc,nsc->nts", e, e)
    return np.einsum("ntc,nsc->nts", e, e)


def _outer(m: Any) -> Any:
    """Per row of m (n, channels): m m^T (n, channels, channels)."""
    return m[:, :, None] * m[:, None, :]


@dataclass(frozen=True)
class SequenceMoments:
    """Sums over scaled weeks that merge across hospitals by adding.

    sums, squares: per (day, channel) sums of values and of squared values;
    week_products: (channels, channels) sum of the outer products of weekly means (-> how
        patients' weekly levels spread and go together);
    within: (channels, channels) sum of each week's within-week products about its own weekly
        mean, once the (day, channel) means are removed (-> day-to-day spread and how channels
        move together from day to day);
    lag1: per channel, sum of each week's lag-1 products of those deviations / length
        (-> carry-over from one day to the next);
    day_by_day: (length, length) sum of `_day_by_day` of those deviations in day_sd units
        (-> each day's spread and its carry-over to every other day, pooled over channels);
    level_by_day: (length, channels) sum of each week's level (weekly mean about the centre) times
        its deviation on each day, per channel (-> whether the week's shape goes with its level:
        a generator let the weekend dip of resting heart rate grow with the level, r 0.87 where
        real weeks have 0.00);
    day_sd: the per-channel unit of day_by_day (public: the schema's `day_sd`, or ones).
    """

    sums: np.ndarray
    squares: np.ndarray
    count: float
    week_products: np.ndarray
    within: np.ndarray
    lag1: np.ndarray
    day_by_day: np.ndarray
    level_by_day: np.ndarray
    day_sd: np.ndarray

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "sums",
        "squares",
        "week_products",
        "within",
        "lag1",
        "day_by_day",
        "level_by_day",
        "day_sd",
    )

    @classmethod
    def of(cls, x: np.ndarray, *, day_sd: np.ndarray | None = None) -> SequenceMoments:
        """Exact sums of the weeks x (n, length, channels); `day_sd`: the unit of day_by_day."""
        x = x.astype(np.float64)
        unit = np.ones(x.shape[2]) if day_sd is None else np.asarray(day_sd, dtype=np.float64)
        y = x - x.mean(axis=0)
        level, deviations, within, lag1 = _rhythm_terms(y)
        return cls(
            sums=x.sum(axis=0),
            squares=(x**2).sum(axis=0),
            count=float(len(x)),
            week_products=_outer(x.mean(axis=1)).sum(axis=0),
            within=within.sum(axis=0),
            lag1=lag1.sum(axis=0),
            day_by_day=_day_by_day(deviations / unit).sum(axis=0),
            level_by_day=(level[:, None, :] * deviations).sum(axis=0),
            day_sd=unit,
        )

    def to_json(self) -> str:
        data: dict[str, Any] = {name: getattr(self, name).tolist() for name in self._FIELDS}
        return json.dumps({**data, "count": self.count})

    @classmethod
    def from_json(cls, text: str) -> SequenceMoments:
        data = json.loads(text)
        missing = [name for name in (*cls._FIELDS, "count") if name not in data]
        if missing:
            raise ValueError(f"sequence moments lack {missing} (written by an older MindFed?)")
        arrays = {name: np.asarray(data[name], dtype=np.float64) for name in cls._FIELDS}
        return cls(count=float(data["count"]), **arrays)

    def problem(self, length: int, day_sd: np.ndarray) -> str | None:
        """Why these sums cannot be those of `length`-day weeks of len(day_sd) channels in
        `day_sd` units (a shape, a non-finite value, other units), or None."""
        channels = len(day_sd)
        shapes = {
            "sums": (length, channels),
            "squares": (length, channels),
            "week_products": (channels, channels),
            "within": (channels, channels),
            "lag1": (channels,),
            "day_by_day": (length, length),
            "level_by_day": (length, channels),
            "day_sd": (channels,),
        }
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value.shape != shape:
                return f"sequence moments' {name} has shape {value.shape}, expected {shape}"
            if not np.isfinite(value).all():
                return f"sequence moments' {name} is not finite"
        if not math.isfinite(self.count):
            return "sequence moments' count is not finite"
        if not np.allclose(self.day_sd, day_sd):
            expected = np.asarray(day_sd).tolist()
            return f"sequence moments are in day_sd units {self.day_sd.tolist()}, expected {expected}"
        return None

    def merged(self, other: SequenceMoments) -> SequenceMoments:
        if not np.allclose(self.day_sd, other.day_sd):
            raise ValueError(f"sequence moments in different day_sd units: {self.day_sd} vs {other.day_sd}")
        sums = {name: getattr(self, name) + getattr(other, name) for name in self._FIELDS if name != "day_sd"}
        return SequenceMoments(count=self.count + other.count, day_sd=self.day_sd, **sums)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std per (day, channel), projected onto what [0, 1] data allows (noise can overshoot)."""
        count = max(self.count, 1.0)
        mean = np.clip(self.sums / count, 0.0, 1.0)
        var = np.clip(self.squares / count - mean**2, 0.0, 0.25)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def rhythm(self) -> dict[str, np.ndarray]:
        """The generator's moments target, projected onto what [0, 1] data allows.

        mean (day, channel); per channel: sd (pooled over days), between_sd and within_sd (their
        diagonals' roots) and lag1 (autocovariance of the within-week deviations); between_cov and
        within_cov (channels, channels): covariances of weekly means and of day-to-day deviations,
        made positive semi-definite (noise can leave negative eigenvalues); day_by_day (length,
        length): the covariance of the deviations across days per channel, in day_sd units,
        averaged over channels (also made positive semi-definite); day_sd: its unit;
        level_by_day (length, channels): the covariance of a week's level with each day's deviation.
        """
        count = max(self.count, 1.0)
        mean, _ = self.mean_std()
        week_mean = mean.mean(axis=0)
        cells = count * self.sums.shape[0]
        pooled = np.clip(self.sums.sum(axis=0) / cells, 0.0, 1.0)
        # Floors keep the standardised losses finite where noise leaves a channel no spread.
        sd = np.sqrt(np.clip(self.squares.sum(axis=0) / cells - pooled**2, 1e-6, 0.25))
        between = _nearest_covariance(self.week_products / count - np.outer(week_mean, week_mean))
        within = _nearest_covariance(self.within / count)
        within_var = np.diag(within)
        lag1 = np.clip(self.lag1 / count, -within_var, within_var)
        out = {
            "mean": mean,
            "sd": sd,
            "between_sd": np.sqrt(np.diag(between)),
            "within_sd": np.sqrt(within_var),
            "between_cov": between,
            "within_cov": within,
            "lag1": lag1,
            "day_by_day": _nearest_covariance(self.day_by_day / count / len(self.day_sd), ceiling=np.inf),
            "level_by_day": self.level_by_day / count,
            "day_sd": self.day_sd,
        }
        return {key: value.astype(np.float32) for key, value in out.items()}


def _nearest_covariance(matrix: np.ndarray, floor: float = 1e-8, ceiling: float = 0.25) -> np.ndarray:
    """Symmetric, eigenvalues in [floor, ceiling]: the covariance nearest a noisy estimate."""
    values, vectors = np.linalg.eigh(_symmetric(matrix))
    return (vectors * np.clip(values, floor, ceiling)) @ vectors.T


def _clip_norms(length: int, n_channels: int) -> dict[str, float]:
    """L2 bound of each clipped per-record input: weekly means - 1/2 on the [0, 1] scale, weekly
    means about the centre in week_sd units ("between weeks"), deviations in day_sd units ("day
    deviations", and "within weeks", whose clipped deviations also feed blocks 5 and 6)."""
    deviation = DEVIATION_CLIP * math.sqrt(length * n_channels)
    return {
        "weekly means": MEAN_CLIP_SHARE * math.sqrt(n_channels) / 2,
        "day deviations": deviation,
        "between weeks": BETWEEN_CLIP * math.sqrt(n_channels),
        "within weeks": deviation,
    }


def moments_sensitivity(length: int, n_channels: int) -> dict[str, float]:
    """L2 sensitivity of each block of the release when one week is added.

    weekly means (sums of weekly means - 1/2 clipped to norm tau_m, and the count, to which a week
    adds tau_m): sqrt(2) tau_m. day deviations (each day's deviation from its weekly mean, in
    day_sd units, clipped to norm tau_d): tau_d. between weeks (m m^T for the weekly means about the
    centre in week_sd units, clipped to norm tau_b, and m itself): its Frobenius norm is |m|^2, so
    the block's norm is at most sqrt(tau_b^4 + tau_b^2). within weeks (sum_t e_t e_t^T / length
    and the lag-1 terms, e the deviations in day_sd units clipped to norm tau_w): a sum of
    positive semi-definite matrices has Frobenius norm at most its trace,
    |e|^2 / length; each |lag-1 term| is at most its channel's share of that trace (|ab| <=
    (a^2 + b^2) / 2 over the pairs), so the lag-1 block's norm is at most |e|^2 / length too, and
    sqrt(2) tau_w^2 / length bounds the block. day by day (sum_c e_c e_c^T for the same clipped
    deviations, e_c the channel's days): positive semi-definite again, so its Frobenius norm is at
    most its trace |e|^2 <= tau_w^2. level by day (m_c e_tc for the clipped m and e): its Frobenius
    norm is sqrt(sum_c m_c^2 |e_c|^2) <= |m| |e| <= tau_b tau_w.
    """
    tau = _clip_norms(length, n_channels)
    return {
        "weekly means": math.sqrt(2) * tau["weekly means"],
        "day deviations": tau["day deviations"],
        "between weeks": math.sqrt(tau["between weeks"] ** 4 + tau["between weeks"] ** 2),
        "within weeks": math.sqrt(2) * tau["within weeks"] ** 2 / length,
        "day by day": tau["within weeks"] ** 2,
        "level by day": tau["between weeks"] * tau["within weeks"],
    }


def _clip_rows(y: np.ndarray, bound: float) -> np.ndarray:
    """Each record (first axis of y) scaled down to L2 norm `bound` if it is longer."""
    axes = tuple(range(1, y.ndim))
    norms = np.sqrt((y**2).sum(axis=axes, keepdims=True))
    return y * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def second_moment_rows(m: np.ndarray, e: np.ndarray) -> dict[str, np.ndarray]:
    """Each week's own entry in blocks 3-6 of the release, from its clipped level m (n, channels;
    week_sd units) and clipped deviations e (n, length, channels; day_sd units): what one week
    adds to each released sum, so `moments_sensitivity` bounds each row's norm."""
    _, _, products, lag1 = _rhythm_terms(e)
    return {
        "between weeks": np.concatenate([_outer(m), m[:, None, :]], axis=1),
        "within weeks": np.concatenate([products, lag1[:, None, :]], axis=1),
        "day by day": _day_by_day(e),
        "level by day": m[:, None, :] * e,
    }


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    """Average a noisy matrix with its transpose (post-processing: halves the off-diagonal noise)."""
    return (matrix + matrix.T) / 2


def release_noisy_moments(
    x: np.ndarray,
    *,
    ledger: PrivacyLedger,
    noise_multiplier: float,
    rng: np.random.Generator,
    what: str,
    day_sd: np.ndarray,
    week_sd: np.ndarray,
) -> SequenceMoments:
    """Six Gaussian releases with one noise multiplier (sigma = multiplier x the block's
    sensitivity, see `moments_sensitivity`), each charged to the ledger:

    1. weekly means (and the count), 2. each day's deviation from its weekly mean -> together the
       (day, channel) means, the centre;
    3. outer products of the weekly means about the centre (and their sum), 4. within-week products and lag-1
       terms of the day-to-day deviations about it, 5. their day x day products pooled over
       channels, 6. the level times each day's deviation -> the rhythm's second moments.

    Deviations are measured in `day_sd` units (public, declared per channel in the schema) before
    clipping, so every channel's day-to-day spread comes out with about the same relative error:
    with one bound on the [0, 1] scale the noise, sized for sleep's spread, swamped resting heart
    rate's (DP within sd 0.025 and HRV 0.010, for real 0.016 and 0.021). Weekly means are measured
    in `week_sd` units (declared too) for the same reason. Centring blocks 3-6 on the
    hospital's own noisy means (post-processing of blocks 1-2) is what lets their bounds sit near
    the real spread instead of the whole declared range. Everything is converted back to raw sums,
    so hospitals merge by adding and the noise of the centre cancels from the spread estimates.
    """
    blocks = len(MOMENT_BLOCKS)
    ledger.check(
        f"{what} ({blocks} blocks)", noise_multiplier=noise_multiplier, sample_rate=1.0, steps=blocks
    )
    x = np.clip(x.astype(np.float64), 0.0, 1.0)
    length, channels = x.shape[1:]
    tau = _clip_norms(length, channels)
    sigma = {name: noise_multiplier * s for name, s in moments_sensitivity(length, channels).items()}

    def noisy(name: str, total: np.ndarray) -> np.ndarray:
        ledger.charge_gaussian(f"{what} ({name})", noise_multiplier=noise_multiplier)
        return total + rng.normal(0.0, sigma[name], total.shape)

    week = x.mean(axis=1)
    tau_m = tau["weekly means"]
    week_block = noisy("weekly means", np.append(_clip_rows(week - 0.5, tau_m).sum(axis=0), tau_m * len(x)))
    count = week_block[-1] / tau_m
    n = max(count, 1.0)
    deviations = _clip_rows((x - week[:, None, :]) / day_sd, tau["day deviations"]).sum(axis=0)
    sums = week_block[:-1] + 0.5 * n + noisy("day deviations", deviations) * day_sd
    centre = np.clip(sums / n, 0.0, 1.0)

    m = (x - centre).mean(axis=1)
    m_units = _clip_rows(m / week_sd, tau["between weeks"])
    e = _clip_rows((x - centre - m[:, None, :]) / day_sd, tau["within weeks"])
    totals = {name: noisy(name, rows.sum(axis=0)) for name, rows in second_moment_rows(m_units, e).items()}
    block = totals["between weeks"]
    # About the weeks' own mean, not the noisy centre: the centre's noise (0.01 on the [0, 1]
    # scale at 1,000 weeks) would otherwise add its square to every variance.
    first = block[channels]
    between = (_symmetric(block[:channels]) - np.outer(first, first) / n) * np.outer(week_sd, week_sd)
    within_block = totals["within weeks"]
    day_by_day = _symmetric(totals["day by day"])
    level_by_day = totals["level by day"] * week_sd * day_sd
    scale = np.outer(day_sd, day_sd)
    within = _symmetric(within_block[:channels]) * scale
    # Raw sums from the centred ones: sum of m m^T = sum of (m - c)(m - c)^T + n c c^T (the cross
    # terms are the stage-1 residual, zero by the choice of c); each day's square adds the
    # between and within spread.
    week_centre = centre.mean(axis=0)
    return SequenceMoments(
        sums=sums,
        squares=n * centre**2 + np.maximum(np.diag(between), 0.0) + np.maximum(np.diag(within), 0.0),
        count=count,
        week_products=between + n * np.outer(week_centre, week_centre),
        within=within,
        lag1=within_block[channels] * day_sd**2,
        day_by_day=day_by_day,
        level_by_day=level_by_day,
        day_sd=np.asarray(day_sd, dtype=np.float64),
    )
