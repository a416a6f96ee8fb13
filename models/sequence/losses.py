"""TimeGAN's losses: the per-record DP losses and the generator's post-processing losses."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.sequence.moments import SequenceMoments, _day_by_day, _rhythm_terms


def _prior_loss(prior: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-record squared error of the predicted weekly channel means, in units of 1 / scale."""
    return (((prior - x.mean(dim=1)) * scale) ** 2).mean(dim=1)


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
