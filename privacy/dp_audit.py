"""The DP privacy audit: attack-score histograms a hospital releases with Gaussian noise, and the
audit's figures (ROC, AUC with its interval, TPR at low FPR, DCR protection) computed from them.

A hospital scores its own members and held-out patients with two membership attacks against a
synthetic sample it drew itself from the global model, bins the scores on edges taken from a
second synthetic sample (public: a function of the model and fresh randomness), and releases the
two histograms per attack with Gaussian noise, charged to its ledger. Each patient's score
depends only on that patient and the synthetic samples, so adding or removing one patient moves
one count by one in each attack's pair of histograms: L2 sensitivity sqrt(number of attacks).
Everything the server computes from them is post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privacy.attacks import FPR_GRID, gaussian_kde_logpdf, nearest_distances, scott_bandwidth

FloatArray = NDArray[np.float64]

AUDIT_ATTACKS: tuple[str, ...] = ("distance", "density")
AUDIT_CHARGE = "privacy audit"  # the ledger entry's label
EDGES_SUFFIX = ".edges"  # "<attack>.edges": an attack's bin edges beside its counts in a reply
# Bin edges at these quantiles of the reference sample's scores: fine at the member-like end
# (high scores), where a low-FPR attack lives, coarse elsewhere so noise does not swamp the bins.
EDGE_QUANTILES: tuple[float, ...] = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
_STREAM_BOOTSTRAP = 11


def attack_scores(real: FloatArray, synthetic: FloatArray, *, bandwidth: float) -> dict[str, FloatArray]:
    """Each attack's score of every real row (higher: more member-like).

    distance: minus the distance to the closest synthetic row (a memorised record has a copy);
    density: log of the synthetic sample's Gaussian KDE at the row (Monte-Carlo / LOGAN-style).
    """
    return {
        "distance": -nearest_distances(synthetic, real, k=1)[:, 0],
        "density": gaussian_kde_logpdf(synthetic, real, bandwidth),
    }


def sample_bandwidth(synthetic: FloatArray) -> float:
    """The KDE bandwidth from the synthetic sample alone (Scott's rule), so it carries no real data."""
    return scott_bandwidth(synthetic)


def public_edges(reference: FloatArray, synthetic: FloatArray, *, bandwidth: float) -> dict[str, FloatArray]:
    """Per attack, bin edges at `EDGE_QUANTILES` of a second synthetic sample's scores.

    The edges depend on synthetic rows only; repeated quantiles (many exact matches) collapse.
    """
    scores = attack_scores(reference, synthetic, bandwidth=bandwidth)
    return {name: np.unique(np.quantile(s, EDGE_QUANTILES)) for name, s in scores.items()}


def score_counts(scores: FloatArray, edges: FloatArray) -> FloatArray:
    """Counts on `len(edges) + 1` bins: below the first edge, between edges, at or above the last."""
    bins = np.searchsorted(edges, scores, side="right")
    return np.bincount(bins, minlength=len(edges) + 1).astype(np.float64)


def audit_histograms(
    members: FloatArray, holdout: FloatArray, synthetic: FloatArray, reference: FloatArray
) -> tuple[dict[str, FloatArray], dict[str, FloatArray]]:
    """Per attack a (2, bins) array (members' counts, then held-out patients'), and the edges."""
    bandwidth = sample_bandwidth(synthetic)
    edges = public_edges(reference, synthetic, bandwidth=bandwidth)
    member_scores = attack_scores(members, synthetic, bandwidth=bandwidth)
    holdout_scores = attack_scores(holdout, synthetic, bandwidth=bandwidth)
    counts = {
        name: np.stack(
            [score_counts(member_scores[name], edges[name]), score_counts(holdout_scores[name], edges[name])]
        )
        for name in AUDIT_ATTACKS
    }
    return counts, edges


# ---------------------------------------------------------------------------- server side
@dataclass(frozen=True)
class AttackFigures:
    """One attack's figures from noisy histograms; `noise_sd` is the DP noise per count (summed in
    quadrature over pooled hospitals)."""

    auc: float
    auc_ci_low: float
    auc_ci_high: float
    tpr_at_1pct_fpr: float
    tpr_at_1pct_fpr_ci_low: float
    tpr_at_1pct_fpr_ci_high: float
    tpr_at_01pct_fpr: float
    n_members: float
    n_nonmembers: float
    noise_sd: float
    roc_fpr: tuple[float, ...]
    roc_tpr: tuple[float, ...]


def _non_decreasing(values: FloatArray) -> FloatArray:
    """The least-squares non-decreasing fit (pool adjacent violators; a dozen points, so a loop)."""
    blocks: list[list[float]] = []  # [sum, count] of each pooled run
    for value in values:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(int(count), total / count) for total, count in blocks])


def _cumulative_shares(counts: FloatArray) -> FloatArray:
    """Share of a group at or above each bin edge, from the most member-like bin down: cumulative
    noisy counts over the noisy total, made non-decreasing by isotonic least squares.

    Clipping each noisy count at 0 first would inflate near-empty bins (E[max(0, c + noise)] > c),
    most for the smaller group, the held-out patients: their share at the member-like end grows and
    the AUC drifts towards "no leak" (0.46 for a chance-level attack at 50 held-out patients). The
    monotone projection of the cumulative sums keeps the AUC unbiased; at 1% FPR, where a few
    patients and the noise decide, it errs the other way (README), which the gates allow for.
    """
    raw = np.r_[0.0, np.cumsum(np.asarray(counts, dtype=np.float64)[::-1])]
    shares = raw / max(float(raw[-1]), 1e-12)
    fitted = np.clip(_non_decreasing(shares), 0.0, 1.0)
    fitted[0], fitted[-1] = 0.0, 1.0
    return np.maximum.accumulate(fitted)


def roc_points(members: FloatArray, holdout: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(FPR, TPR) at each bin edge, thresholds from the most member-like bin down, (0,0) to (1,1);
    linear between points is the ROC of an attacker who breaks ties inside a bin at random."""
    return _cumulative_shares(holdout), _cumulative_shares(members)


def _area(fpr: FloatArray, tpr: FloatArray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def binned_auc(members: FloatArray, holdout: FloatArray) -> float:
    """Area under the binned ROC: P(member scores higher) with ties inside a bin counted half."""
    return _area(*roc_points(members, holdout))


def tpr_at(members: FloatArray, holdout: FloatArray, targets: FloatArray) -> FloatArray:
    """TPR at each target FPR, linear on the binned ROC."""
    fpr, tpr = roc_points(members, holdout)
    return np.interp(targets, fpr, tpr)


def bootstrap_figures(
    members: FloatArray, holdout: FloatArray, noise_sd: float, *, n_bootstrap: int, seed: int
) -> FloatArray:
    """(AUC, TPR at 1% FPR) of resampled histograms, shape (n_bootstrap, 2): multinomial draws of the
    (clipped) counts plus fresh DP noise, so intervals cover both the patients' sampling and the noise."""
    rng = np.random.default_rng([_STREAM_BOOTSTRAP, seed])
    parts = []
    for counts in (members, holdout):
        clipped = np.clip(counts, 0.0, None)
        total = max(round(float(clipped.sum())), 1)
        parts.append((total, clipped / max(clipped.sum(), 1e-12)))
    out = np.empty((n_bootstrap, 2))
    for b in range(n_bootstrap):
        m, h = (rng.multinomial(total, p) + rng.normal(0.0, noise_sd, p.size) for total, p in parts)
        fpr, tpr = roc_points(m, h)
        out[b] = _area(fpr, tpr), np.interp(0.01, fpr, tpr)
    return out


def attack_figures(
    parts: list[tuple[FloatArray, float]], *, n_bootstrap: int, seed: int, confidence: float = 0.95
) -> AttackFigures:
    """An attack's figures from one or more hospitals' noisy (2, bins) counts and noise sd.

    Several hospitals (each on its own bins) are pooled by vertical averaging: the AUC, the TPR at
    each FPR and every bootstrap replicate are averaged with weights = each one's held-out count,
    the group that limits the curve's precision. One hospital is the pool of one.
    """
    members = [np.asarray(c[0], dtype=np.float64) for c, _ in parts]
    holdouts = [np.asarray(c[1], dtype=np.float64) for c, _ in parts]
    weights = np.array([max(float(np.clip(h, 0.0, None).sum()), 1.0) for h in holdouts])
    weights /= weights.sum()
    grid = np.asarray(FPR_GRID)
    targets = np.r_[grid, 0.01, 0.001]
    at = sum(w * tpr_at(m, h, targets) for w, m, h in zip(weights, members, holdouts, strict=True))
    auc = sum(w * binned_auc(m, h) for w, m, h in zip(weights, members, holdouts, strict=True))
    boots = sum(
        w * bootstrap_figures(m, h, sd, n_bootstrap=n_bootstrap, seed=seed + i)
        for i, (w, m, h, (_, sd)) in enumerate(zip(weights, members, holdouts, parts, strict=True))
    )
    alpha = (1.0 - confidence) / 2.0
    (low, tpr_low), (high, tpr_high) = np.quantile(boots, [alpha, 1.0 - alpha], axis=0)
    return AttackFigures(
        auc=float(auc),
        auc_ci_low=float(low),
        auc_ci_high=float(high),
        tpr_at_1pct_fpr=float(at[-2]),
        tpr_at_1pct_fpr_ci_low=float(tpr_low),
        tpr_at_1pct_fpr_ci_high=float(tpr_high),
        tpr_at_01pct_fpr=float(at[-1]),
        n_members=float(sum(np.clip(m, 0.0, None).sum() for m in members)),
        n_nonmembers=float(sum(np.clip(h, 0.0, None).sum() for h in holdouts)),
        noise_sd=float(np.sqrt(sum(sd**2 for _, sd in parts))),
        roc_fpr=FPR_GRID,
        roc_tpr=tuple(float(v) for v in at[: grid.size]),
    )


def dcr_protection(distance: AttackFigures, parts: list[tuple[FloatArray, float]]) -> dict[str, Any]:
    """DCR overfitting protection seen from the patients' side: p = P(a member is closer to the
    synthetic sample than a held-out patient), ties half (the distance attack's AUC); score =
    min(1, 2 (1 - p)) as SDMetrics' DCROverfittingProtection maps its share. Also each group's
    noisy share per distance bin (nearest last; averaged over `parts`) and in the closest bin."""
    shares = sum(
        np.clip(c, 0.0, None) / np.maximum(np.clip(c, 0.0, None).sum(axis=1, keepdims=True), 1e-12)
        for c, _ in parts
    ) / len(parts)
    return {
        "score": min(1.0, 2.0 * (1.0 - distance.auc)),
        "closer_to_training": distance.auc,
        "closest_bin_members": float(shares[0][-1]),
        "closest_bin_nonmembers": float(shares[1][-1]),
        "n_members": distance.n_members,
        "n_nonmembers": distance.n_nonmembers,
        "members_share": shares[0].tolist(),
        "nonmembers_share": shares[1].tolist(),
    }
