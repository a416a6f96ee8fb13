"""Conditional TimeGAN (Yoon et al. 2019) for the daily wearable weeks, DP-SGD on every record reader."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import ndtri
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from configs.schema import CohortSchema, SequenceSpec
from models.ctgan_dp import DPSpec, FitReport
from models.encoder import EncoderError, TabularEncoder
from models.registry import register
from privacy.facade import PrivateTraining, make_private, prepare_module
from privacy.ledger import PrivacyLedger

logger = logging.getLogger(__name__)

PHASES = ("embedding", "supervised", "joint")
# Public stand-in conditions keep numeric (probit) entries where the encoder can put them:
# it clips quantiles to (1e-6, 1 - 1e-6) before the probit.
_Z_LIMIT = float(ndtri(1 - 1e-6))
# Day-to-day sd and between-people sd of the weekly mean on the [0, 1] scale assumed for a
# channel whose schema declares no `day_sd` / `week_sd`.
DEFAULT_DAY_SD = 0.05
DEFAULT_WEEK_SD = 0.1


# ==================================================================== sequence encoding
class SequenceEncoder:
    """Long-format daily table <-> float32 (patients, length, channels) in [0, 1].

    Built from the schema's SequenceSpec alone: the scaling uses the declared public
    [min, max] of each channel (and its declared linear or log scale), so the encoder reveals
    nothing about anyone's rows.
    """

    def __init__(self, spec: SequenceSpec, *, id_column: str = "patient_id"):
        self.spec = spec
        self.id_column = id_column
        self.day_column = spec.day_column
        self.length = spec.length
        self.channels = [c.name for c in spec.channels]
        self._low = np.array([c.min for c in spec.channels], dtype=np.float64)
        self._span = np.array([c.max - c.min for c in spec.channels], dtype=np.float64)
        # Channels declared `scale = "log"` are scaled as log1p(value - min) / log1p(max - min).
        self._log = np.array([c.scale == "log" for c in spec.channels])
        self._log_span = np.log1p(self._span)
        # The declared day-to-day and between-people sds on the [0, 1] scale (a log channel's
        # fraction r moves log1p(value - min) by about r); the defaults where none is declared.
        self.day_sd = self._unit_scale([c.day_sd for c in spec.channels], DEFAULT_DAY_SD)
        self.week_sd = self._unit_scale([c.week_sd for c in spec.channels], DEFAULT_WEEK_SD)

    def _unit_scale(self, declared: list[float | None], default: float) -> np.ndarray:
        return np.array(
            [
                default if d is None else d / (ls if log else span)
                for d, log, ls, span in zip(declared, self._log, self._log_span, self._span, strict=True)
            ]
        )

    @classmethod
    def from_schema(cls, schema: CohortSchema) -> SequenceEncoder:
        if schema.sequence is None:
            raise EncoderError("the cohort schema declares no [sequence] table")
        return cls(schema.sequence, id_column=schema.id_column)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def columns(self) -> list[str]:
        return [self.id_column, self.day_column, *self.channels]

    def transform(self, frame: pd.DataFrame, ids: Sequence[Any] | None = None) -> np.ndarray:
        """Rows -> (len(ids), length, channels), patients in the order of `ids` (default: first seen).

        Pass the static table's ids so row i of the result lines up with its condition vector.
        Values are clipped to the declared range: that bound is what DP sensitivities assume.
        """
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise EncoderError(f"timeseries frame lacks columns {missing}")
        order = pd.Index(pd.unique(frame[self.id_column]) if ids is None else list(ids))
        if order.has_duplicates:
            raise EncoderError("patient ids repeat in the requested order")
        patient = order.get_indexer(frame[self.id_column])
        day = frame[self.day_column].to_numpy(dtype=np.int64) - 1
        if (patient < 0).any():
            raise EncoderError("timeseries has patients outside the requested ids")
        if ((day < 0) | (day >= self.length)).any():
            raise EncoderError(f"days must lie in 1..{self.length}")
        cells = patient * self.length + day
        if len(frame) != len(order) * self.length or len(np.unique(cells)) != len(frame):
            raise EncoderError(f"every patient needs exactly one row for each of the {self.length} days")
        values = frame[self.channels].to_numpy(dtype=np.float64)
        out = np.empty((len(order), self.length, self.n_channels), dtype=np.float64)
        out[patient, day] = self.to_unit(values)
        return out.astype(np.float32)

    def to_unit(self, values: np.ndarray) -> np.ndarray:
        """Raw values (..., channels) -> [0, 1], clipped to the declared range first."""
        shifted = np.clip(values - self._low, 0.0, self._span)
        return np.where(self._log, np.log1p(shifted) / self._log_span, shifted / self._span)

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        """[0, 1] (..., channels) -> raw values inside the declared ranges (inverse of `to_unit`)."""
        unit = np.clip(unit, 0.0, 1.0)
        shifted = np.where(self._log, np.expm1(unit * self._log_span), unit * self._span)
        return np.clip(shifted, 0.0, self._span) + self._low

    def inverse_transform(self, array: np.ndarray, ids: Sequence[Any] | None = None) -> pd.DataFrame:
        """(patients, length, channels) in [0, 1] -> long-format rows inside the declared ranges."""
        n = array.shape[0]
        if array.shape[1:] != (self.length, self.n_channels):
            raise EncoderError(f"array shape {array.shape[1:]} != ({self.length}, {self.n_channels})")
        ids = list(ids) if ids is not None else [f"S{i:06d}" for i in range(1, n + 1)]
        if len(ids) != n:
            raise EncoderError(f"{len(ids)} ids for {n} sequences")
        scaled = self.from_unit(array.astype(np.float64))
        data: dict[str, Any] = {
            self.id_column: np.repeat(np.asarray(ids, dtype=object), self.length),
            self.day_column: np.tile(np.arange(1, self.length + 1, dtype=np.int64), n),
        }
        for j, name in enumerate(self.channels):
            data[name] = scaled[:, :, j].reshape(-1)
        return pd.DataFrame(data, columns=self.columns)


# ==================================================================== moments (sums and counts)
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


def encode_stand_ins(profiles: np.ndarray) -> bytes:
    """Encoded stand-in profiles (n, width) as .npy bytes, for a ConfigRecord (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(profiles, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def decode_stand_ins(data: bytes, width: int) -> np.ndarray:
    """The inverse of `encode_stand_ins`, refused unless it is a finite float (n >= 1, width) array."""
    try:
        profiles = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise EncoderError(f"stand-in profiles are not a readable .npy array: {err}") from err
    if profiles.dtype.kind != "f":
        raise EncoderError(f"stand-in profiles must be a float array, got {profiles.dtype}")
    return checked_stand_ins(profiles, width)


def checked_stand_ins(profiles: np.ndarray, width: int) -> np.ndarray:
    """Stand-in profiles as float32, refused unless finite with shape (n >= 1, width)."""
    profiles = np.asarray(profiles, dtype=np.float32)
    if profiles.ndim != 2 or profiles.shape[1] != width or not len(profiles):
        raise EncoderError(f"stand-in profiles must have shape (n >= 1, {width}), got {profiles.shape}")
    if not np.isfinite(profiles).all():
        raise EncoderError("stand-in profiles contain NaN or infinite values")
    return profiles


# ==================================================================== networks
class RecurrentNet(nn.Module):
    """GRU over the days (optionally fed the static condition every day), then a per-day linear head."""

    def __init__(
        self,
        input_dim: int,
        cond_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        *,
        sigmoid: bool,
        prior_dim: int = 0,
    ):
        super().__init__()
        self.cond_dim = cond_dim
        self.rnn = nn.GRU(input_dim + cond_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_dim, output_dim)
        self.sigmoid = sigmoid
        if prior_dim:
            # Profile -> expected weekly mean of each channel (the embedder's side head, DP-trained
            # with it): the static-sequence link in a form a generator can be taught directly.
            # Linear (before the sigmoid): with a hidden layer it leaned on proxies the static
            # generator does not keep (occupation for age), and on that generator's profiles its
            # age~HRV slope fell from -0.61 to -0.36 sd; the worst link gap went from 0.32 to 0.14.
            self.prior = nn.Sequential(nn.Linear(cond_dim, prior_dim), nn.Sigmoid())

    def forward(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_dim:
            assert cond is not None, "this network is conditioned on the static profile"
            seq = torch.cat([seq, cond[:, None, :].expand(-1, seq.shape[1], -1)], dim=-1)
        out, _ = self.rnn(seq)
        out = self.head(out)
        return torch.sigmoid(out) if self.sigmoid else out


class _AutoEncoder(nn.Module):
    """Embedder + recovery as one module, so the embedding phase is one DP optimizer, one charge."""

    def __init__(self, embedder: nn.Module, recovery: nn.Module):
        super().__init__()
        self.embedder, self.recovery = embedder, recovery

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.recovery(self.embedder(x, cond)), self.embedder.prior(cond)


class _SupervisorAndPrior(nn.Module):
    """Supervisor + the embedder's link prior: one DP optimizer in the supervised phase."""

    def __init__(self, supervisor: nn.Module, prior: nn.Module):
        super().__init__()
        self.supervisor, self.prior = supervisor, prior

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.supervisor(h), self.prior(cond)


def _prior_loss(prior: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-record squared error of the predicted weekly channel means, in units of 1 / scale."""
    return (((prior - x.mean(dim=1)) * scale) ** 2).mean(dim=1)


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """No gradients into these modules while a post-processing loss flows through them."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for module, saved in zip(modules, flags, strict=True):
            for p, flag in zip(module.parameters(), saved, strict=True):
                p.requires_grad_(flag)


def _reconstruction_and_prior_loss(
    m: nn.Module, x: torch.Tensor, c: torch.Tensor, prior_weight: float, scale: torch.Tensor
) -> torch.Tensor:
    """Embedding phase, per record: reconstruction error + the link prior's error (one DP unit)."""
    x_tilde, prior = m(x, c)
    return (((x_tilde - x) * scale) ** 2).mean(dim=(1, 2)) + prior_weight * _prior_loss(prior, x, scale)


def _channel_scale(moments: SequenceMoments | None, n_channels: int, device: torch.device) -> torch.Tensor:
    """1 / the DP sd of each channel (ones without moments): the per-record losses in sd units.

    On the [0, 1] scale a record's reconstruction gradient was about 0.04, far below the clipping
    norm (1.0), so DP-SGD's noise (sigma x clipping norm) buried it and the recovery could not
    reach the real range of a channel (steps: outputs 0.55-0.77 for real weeks around 0.83).
    In sd units the gradients reach the clipping norm, where DP-SGD's signal-to-noise ratio is
    highest. The scale is post-processing of the handshake's DP moments.
    """
    if moments is None:
        return torch.ones(n_channels, device=device)
    return (1.0 / torch.from_numpy(moments.rhythm()["sd"])).to(device)


def _per_record_bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Per-day BCE averaged over the days: one loss per record (Opacus sums these)."""
    labels = torch.full_like(logits, target)
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)


# ==================================================================== the model
@register("timegan")
class TimeGAN:
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
    # Not a static-table model: fit() takes weeks plus conditions and sample() takes profiles.
    kind: ClassVar[str] = "sequence"
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
            return self.public_conditions(n, rng)
        return pool[rng.integers(0, len(pool), n)]

    def _noise(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The generator's input per day: Gaussian daily noise, the week's noise (the same every
        day) and the day's one-hot; shape (n, length, noise_dim + week_noise_dim + length)."""
        length = self.sequence.length
        noise = torch.randn((n, length, self.config.noise_dim), generator=generator)
        week = torch.randn((n, 1, self.config.week_noise_dim), generator=generator).expand(-1, length, -1)
        days = torch.eye(length).expand(n, -1, -1)
        return torch.cat([noise, week, days], dim=-1).to(device)

    # ---------------------------------------------------------------- training
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
    ) -> FitReport:
        """One local training pass of a phase: "embedding", "supervised" or "joint".

        `stand_ins`: encoded profiles from the DP static generator for the joint phase's
        generator (see `stand_in_conditions`); the other phases do not use them.
        """
        kwargs = {"epochs": epochs, "batch_size": batch_size, "dp": dp, "device": device, "seed": seed}
        if phase == "embedding":
            return self.fit_embedding(data, cond, moments=moments, **kwargs)
        if phase == "supervised":
            return self.fit_supervised(data, cond, moments=moments, **kwargs)
        if phase == "joint":
            return self.fit_joint(data, cond, moments=moments, stand_ins=stand_ins, **kwargs)
        raise ValueError(f"unknown TimeGAN phase {phase!r}; expected one of {PHASES}")

    def _loader(self, data: np.ndarray, cond: np.ndarray, batch_size: int, seed: int) -> DataLoader:
        """Weeks and their static conditions in one dataset, so Poisson sampling draws them together."""
        if data.shape[1:] != (self.sequence.length, self.sequence.n_channels):
            raise ValueError(f"data shape {data.shape} does not fit the schema's sequence")
        if cond.shape != (len(data), self.cond_dim):
            raise ValueError(f"cond shape {cond.shape} != ({len(data)}, {self.cond_dim})")
        x = torch.from_numpy(np.clip(data, 0.0, 1.0).astype(np.float32))
        c = torch.from_numpy(cond.astype(np.float32))
        return DataLoader(
            TensorDataset(x, c),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )

    def _privatise(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        dp: DPSpec,
        what: str,
        epochs: int,
        *,
        checked: bool = False,
    ) -> PrivateTraining:
        """Refuse before anything runs if the planned steps do not fit, then wrap for DP-SGD.

        The ledger's accountant is shared with Opacus, so every step of every phase composes
        with all earlier charges of this hospital (same records, same accountant).
        """
        if not checked:
            dp.ledger.check(
                what,
                noise_multiplier=dp.noise_multiplier,
                sample_rate=1 / len(loader),
                steps=epochs * len(loader),
            )
        return make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            clipping_norm=dp.clipping_norm,
            ledger=dp.ledger,
        )

    @staticmethod
    def _unwrap(private: PrivateTraining, dp: DPSpec, what: str, steps: int) -> nn.Module:
        """Log the steps Opacus charged, drop hooks and per-sample buffers, return the plain module."""
        dp.ledger.record_training(
            what, noise_multiplier=dp.noise_multiplier, sample_rate=private.sample_rate, steps=steps
        )
        private.module.remove_hooks()
        plain = private.module._module
        for p in plain.parameters():
            p.grad, p.grad_sample = None, None
            if hasattr(p, "summed_grad"):
                p.summed_grad = None
        return plain

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
    ) -> tuple[nn.Module, float, FitReport]:
        """One record-seeing module trained on per-record losses, DP-SGD under `dp`."""
        optimizer = torch.optim.Adam(module.parameters(), lr=self.config.learning_rate)
        what = f"{dp.label} ({phase} phase)" if dp else ""
        private = self._privatise(module, optimizer, loader, dp, what, epochs) if dp else None
        if private is not None:
            module, optimizer, loader = private.module, private.optimizer, private.data_loader
        report = FitReport()
        loss_sum = 0.0
        for _ in range(epochs):
            for x, c in loader:
                x, c = x.to(device), c.to(device)
                optimizer.zero_grad(set_to_none=True)
                per_record = per_record_loss(module, x, c)
                # Summed over records: Opacus clips each record's gradient (loss_reduction="sum").
                per_record.sum().backward()
                optimizer.step()
                loss_sum += float(per_record.mean().detach()) if len(x) else 0.0
                report.steps += 1
                report.records_seen += len(x)
        if private is not None and dp is not None:
            module = self._unwrap(private, dp, what, report.steps)
        return module, loss_sum, report

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
            module, loader, "supervised", epochs=epochs, dp=dp, device=device, per_record_loss=next_step_loss
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
            moments = self._release_moments(data, dp, what, len(loader) * epochs, 1 / len(loader), rng)
        target = self._moment_target(moments, device)
        generator = self.generator.to(device).train()
        embedder, supervisor, recovery = (
            m.to(device).eval() for m in (self.embedder, self.supervisor, self.recovery)
        )
        discriminator: nn.Module = self.discriminator.to(device).train()
        tuned = [*generator.parameters(), *(recovery.parameters() if self.config.tune_recovery else ())]
        opt_g = torch.optim.Adam(tuned, lr=self.config.generator_lr or self.config.learning_rate)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=self.config.discriminator_lr)
        private = (
            self._privatise(discriminator, opt_d, loader, dp, what, epochs, checked=release) if dp else None
        )
        if private is not None:
            discriminator, opt_d, loader = private.module, private.optimizer, private.data_loader
        report = FitReport()
        moments_sum = 0.0
        prior = embedder.prior
        fixed = (embedder, supervisor) if self.config.tune_recovery else (embedder, supervisor, recovery)
        with _frozen(*fixed):
            for _ in range(epochs):
                for x, c in loader:
                    x, c = x.to(device), c.to(device)
                    report.discriminator_loss_sum += self._discriminator_step(
                        discriminator, opt_d, x, c, noise_gen, rng, pool
                    )
                    for _ in range(self.config.generator_steps):
                        g_cond, g_target = self._generator_inputs(x, c, target, dp, g_batch, rng, pool)
                        g_loss, m_loss = self._generator_step(
                            discriminator, opt_g, opt_d, g_cond, g_target, noise_gen, prior
                        )
                        report.generator_loss_sum += g_loss
                        moments_sum += m_loss
                    report.steps += 1
                    report.records_seen += len(x)
        if private is not None and dp is not None:
            discriminator = self._unwrap(private, dp, what, report.steps)
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
        with torch.no_grad():
            h_real = self.embedder(x, c)
            e_hat = self.generator(self._noise(len(x), noise_gen, x.device), c)
            h_hat = self.supervisor(e_hat) if self.config.through_supervisor else e_hat
        gamma = self.config.gamma if self.config.through_supervisor else 0.0
        mismatch = 0.0
        if self.config.mismatch_weight > 0:
            c_pub = torch.from_numpy(self.stand_in_conditions(len(x), rng, pool)).to(x.device)
            mismatch = self.config.mismatch_weight * _per_record_bce(
                discriminator(h_real, c_pub).squeeze(-1), 0.0
            )
        per_record = (
            mismatch
            + _per_record_bce(discriminator(h_real, c).squeeze(-1), 1.0)
            + _per_record_bce(discriminator(h_hat, c).squeeze(-1), 0.0)
            + gamma * _per_record_bce(discriminator(e_hat, c).squeeze(-1), 0.0)
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
        hooks = hasattr(discriminator, "disable_hooks")
        if hooks:  # D is not updated here: no per-sample gradients needed
            discriminator.disable_hooks()
        opt_g.zero_grad(set_to_none=True)
        e_hat = self.generator(self._noise(len(cond), noise_gen, cond.device), cond)
        h_hat = self.supervisor(e_hat)
        latent = h_hat if self.config.through_supervisor else e_hat
        x_hat = self.recovery(latent)
        adversarial = _per_record_bce(discriminator(latent, cond).squeeze(-1), 1.0).mean()
        adversarial_e = (
            _per_record_bce(discriminator(e_hat, cond).squeeze(-1), 1.0).mean()
            if self.config.through_supervisor
            else 0.0
        )
        # h_hat = S(e_hat) is the supervisor's next-day prediction: generated latents should
        # follow the dynamics the DP-trained supervisor learned from real embeddings.
        supervised = F.mse_loss(h_hat[:, :-1], e_hat[:, 1:])
        # The link: for its (stand-in) profile a generated week's channel means should sit where
        # the DP-trained prior puts real weeks with that profile (post-processing of a DP module).
        with torch.no_grad():
            expected = prior(cond)
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
        opt_d.zero_grad(set_to_none=True)  # drop D's gradients from this pass
        if hooks:
            discriminator.enable_hooks()
        return float(loss.detach()), float(moments.detach())

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_encoded(self, cond: np.ndarray, *, seed: int, batch_size: int = 1000) -> np.ndarray:
        """One scaled week (length, channels) in [0, 1] per given condition vector."""
        if cond.ndim != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond must have shape (n, {self.cond_dim}), got {cond.shape}")
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


def _link_loss(week_means: torch.Tensor, expected: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Per channel over the batch: |mean residual| + the residual's shift per sd of the prior and
    per sd of each condition entry (all in the units of the inputs).

    Pinning every week's means to the prior removed all person-level spread the prior does not
    explain; this asks only what defines a conditional mean: residuals centred and uncorrelated
    with the prior and with every entry of the profile, leaving the residual spread to the
    moments loss. Uncorrelated with the prior alone, generated weeks followed depression harder
    than the prior does (steps: synthetic r -0.85, real -0.57) and age not at all.
    """
    residual = week_means - expected
    residual = residual - residual.mean(dim=0)
    regressors = torch.cat([expected, cond], dim=1)
    centred = regressors - regressors.mean(dim=0)
    # covariance / sd of the regressor: the missed shift of the weekly mean per sd of that entry;
    # the floor keeps entries without spread in this batch (a rare category) at zero shift.
    shift = (residual.T @ centred) / len(residual) / (centred.var(dim=0) + 1e-4).sqrt()
    return (week_means - expected).mean(dim=0).abs().mean() + shift.abs().mean()


def _moments_loss(x: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """TimeGAN's moments loss, widened to the week's rhythm, each gap relative to the spread it
    belongs to (so narrow channels count as much as wide ones): the weekly level in units of the
    channel's sd; the day-of-week pattern, the covariance of the day-to-day deviations and their
    lag-1 carry-over in units of the within-week sds; the covariance of weekly levels between
    patients in units of the between sds; the day x day covariance of the deviations (pooled over
    channels in day_sd units) relative to its mean diagonal; the covariance of the level with each
    day's deviation in units of between sd x within sd.

    Means and one overall sd alone let the generator put all spread into one daily factor shared
    by every channel: right marginals, but weeks a recurrent classifier tells apart at once.
    """
    sd, within_sd, between_sd = target["sd"], target["within_sd"], target["between_sd"]
    y = x - target["mean"]
    week, _, products, lag1 = _rhythm_terms(y)
    level = week.mean(dim=0)
    day_pattern = y.mean(dim=0) - level
    centred = week - level
    between = centred.T @ centred / max(len(x) - 1, 1)
    within = products.mean(dim=0)
    # Recomputed rather than taken from _rhythm_terms: the same values, but a shared tensor sums
    # the gradients in another order, and the GAN's training then drifts to other weeks.
    deviations = y - week[:, None, :]
    days = _day_by_day(deviations / target["day_sd"]).mean(dim=0) / y.shape[2]
    day_target = target["day_by_day"]
    level_by_day = (centred[:, None, :] * deviations).mean(dim=0)
    return (
        (level.abs() / sd).mean()
        + (day_pattern.abs() / within_sd).mean()
        + ((between - target["between_cov"]).abs() / torch.outer(between_sd, between_sd)).mean()
        + ((within - target["within_cov"]).abs() / torch.outer(within_sd, within_sd)).mean()
        + ((lag1.mean(dim=0) - target["lag1"]).abs() / within_sd**2).mean()
        + (days - day_target).abs().mean() / day_target.diagonal().mean()
        + ((level_by_day - target["level_by_day"]).abs() / (between_sd * within_sd)).mean()
    )
