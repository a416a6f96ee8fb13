"""Local privacy-audit attacks (DCR, membership inference) that report aggregate metrics only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import logsumexp
from scipy.stats import rankdata
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.neighbors import NearestNeighbors

FloatArray = NDArray[np.float64]

# Public, fixed grids. Every hospital resamples its ROC / histograms onto the same points, so
# what leaves the hospital is a fixed-length aggregate (mergeable, and independent of n).
# The log-spaced part resolves the low-FPR regime where membership attacks matter most.
FPR_GRID: tuple[float, ...] = tuple(
    float(v)
    for v in np.unique(np.round(np.concatenate([np.linspace(0.0, 1.0, 101), np.logspace(-4.0, -2.0, 9)]), 12))
)
# DCR edges are log-spaced (8 bins per decade) from 1e-3 to 100 with a first bin [0, 1e-3):
# near-copies (DCR ~ 1e-3..1e-1) and typical standardised-space distances (~1..20) both resolve.
DCR_BIN_EDGES: tuple[float, ...] = (0.0, *(float(v) for v in np.logspace(-3.0, 2.0, 41)))
NNDR_BIN_EDGES: tuple[float, ...] = tuple(float(v) for v in np.linspace(0.0, 1.0, 21))

# Independent random streams per purpose: changing n_bootstrap never changes which rows were
# subsampled, and vice versa.
_STREAM_BALANCE, _STREAM_BOOTSTRAP, _STREAM_MODEL = 0, 1, 2
# Candidate rows per block when evaluating a KDE, bounding memory at ~block * n_fit floats.
_KDE_BLOCK = 1024


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class DCRResult:
    """Distance-to-closest-record audit; every field is a scalar or a fixed-length aggregate.

    `score` is SDMetrics' DCROverfittingProtection: min(1, 2 * (1 - closer_to_training)).
    Histograms are counts of synthetic rows per bin (the last bin also holds everything above
    its upper edge), so hospitals can add them up.
    """

    score: float
    closer_to_training: float
    closer_to_holdout: float
    median_dcr_training: float
    median_dcr_holdout: float
    mean_nndr: float
    n_synthetic: int
    n_training: int
    n_holdout: int
    dcr_bin_edges: tuple[float, ...]
    dcr_training_counts: tuple[int, ...]
    dcr_holdout_counts: tuple[int, ...]
    nndr_bin_edges: tuple[float, ...]
    nndr_counts: tuple[int, ...]


@dataclass(frozen=True)
class AttackResult:
    """One membership-inference attack, summarised; no per-record score ever leaves here.

    `roc_tpr[i]` is the attack's TPR at `roc_fpr[i]` (= FPR_GRID), using `tpr_at_fpr`'s rule.
    """

    name: str
    auc: float
    auc_ci_low: float
    auc_ci_high: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    n_members: int
    n_nonmembers: int
    roc_fpr: tuple[float, ...]
    roc_tpr: tuple[float, ...]


# ---------------------------------------------------------------------------- input checks
def _rng(seed: int, stream: int) -> np.random.Generator:
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return np.random.default_rng([stream, int(seed)])


def _as_matrix(x: ArrayLike, name: str, *, min_rows: int = 1) -> FloatArray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix (rows x features), got shape {m.shape}")
    if m.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {m.shape[0]}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} contains NaN or infinite values; encode/impute first")
    return m


def _same_width(**matrices: FloatArray) -> None:
    widths = {name: m.shape[1] for name, m in matrices.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"all inputs must share one feature encoding; got widths {widths}")


def _balance(a: FloatArray, b: FloatArray, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """Subsample the larger set (without replacement) to the smaller one's size."""
    n = min(len(a), len(b))

    def take(m: FloatArray) -> FloatArray:
        if len(m) == n:
            return m
        # Sorted indices keep the original row order, which makes results easier to reason about.
        return m[np.sort(rng.choice(len(m), size=n, replace=False))]

    return take(a), take(b)


def _check_edges(edges: ArrayLike, name: str) -> FloatArray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError(f"{name} must be >= 2 finite, strictly increasing values")
    return e


def _histogram(values: FloatArray, edges: FloatArray) -> tuple[int, ...]:
    # Clipping into the outer bins counts every synthetic row exactly once, so per-hospital
    # counts always sum to n_synthetic and can be added across hospitals.
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return tuple(int(c) for c in counts)


def nearest_distances(fit: FloatArray, query: FloatArray, k: int) -> FloatArray:
    """Euclidean distances from each query row to its k nearest rows of `fit`, ascending."""
    nn = NearestNeighbors(n_neighbors=k, algorithm="auto", metric="euclidean").fit(fit)
    distances, _ = nn.kneighbors(query)
    return distances


# ---------------------------------------------------------------------------- DCR
def dcr_overfitting_protection(
    training: ArrayLike,
    holdout: ArrayLike,
    synthetic: ArrayLike,
    *,
    seed: int,
    dcr_bin_edges: ArrayLike = DCR_BIN_EDGES,
    nndr_bin_edges: ArrayLike = NNDR_BIN_EDGES,
) -> DCRResult:
    """DCR overfitting protection (SDMetrics' DCROverfittingProtection) plus DCR/NNDR summaries.

    Training (members) and holdout (non-members) are first made the same size by seeded
    subsampling of the larger, so an unbiased generator puts ~half of its rows closer to each
    set. p = share of synthetic rows strictly closer to training than to holdout (ties count as
    holdout, as in SDMetrics); score = min(1, 2 * (1 - p)): 1 = no sign of overfitting,
    0 = every synthetic row sits nearer a training record.

    Distances are Euclidean on the given encoded features (standardised numbers, one-hot
    categories), not SDMetrics' range-normalised per-column distance; scale features before
    calling if some dominate. NNDR = distance to the nearest / second-nearest training record
    (an exact copy of a duplicated record gives 0/0, reported as 0: maximally close).
    """
    train = _as_matrix(training, "training", min_rows=2)
    hold = _as_matrix(holdout, "holdout", min_rows=2)
    syn = _as_matrix(synthetic, "synthetic")
    _same_width(training=train, holdout=hold, synthetic=syn)
    d_edges = _check_edges(dcr_bin_edges, "dcr_bin_edges")
    r_edges = _check_edges(nndr_bin_edges, "nndr_bin_edges")

    train, hold = _balance(train, hold, _rng(seed, _STREAM_BALANCE))
    # One k=2 query gives both the DCR to training and the NNDR denominator.
    d_train_2 = nearest_distances(train, syn, k=2)
    d_train, d_second = d_train_2[:, 0], d_train_2[:, 1]
    d_hold = nearest_distances(hold, syn, k=1)[:, 0]

    closer = float(np.mean(d_train < d_hold))
    nndr = np.divide(d_train, d_second, out=np.zeros_like(d_train), where=d_second > 0)
    return DCRResult(
        score=min(1.0, 2.0 * (1.0 - closer)),
        closer_to_training=closer,
        closer_to_holdout=1.0 - closer,
        median_dcr_training=float(np.median(d_train)),
        median_dcr_holdout=float(np.median(d_hold)),
        mean_nndr=float(np.mean(nndr)),
        n_synthetic=len(syn),
        n_training=len(train),
        n_holdout=len(hold),
        dcr_bin_edges=tuple(float(v) for v in d_edges),
        dcr_training_counts=_histogram(d_train, d_edges),
        dcr_holdout_counts=_histogram(d_hold, d_edges),
        nndr_bin_edges=tuple(float(v) for v in r_edges),
        nndr_counts=_histogram(nndr, r_edges),
    )


# ---------------------------------------------------------------------------- ROC helpers
def _check_labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[FloatArray, FloatArray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError("labels and scores must be 1-D arrays of the same length")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError("labels need both members (1) and non-members (0)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return y.astype(np.float64), s


def _roc_envelope(labels: FloatArray, scores: FloatArray) -> tuple[FloatArray, FloatArray, int]:
    """Distinct ROC FPRs with the best TPR reached at each, and the number of non-members."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # roc_curve is sorted by FPR then TPR, so the last point of each FPR run has its highest TPR.
    last_of_run = np.r_[fpr[1:] != fpr[:-1], True]
    return fpr[last_of_run], tpr[last_of_run], int(np.sum(labels == 0))


def _tpr_on(fpr_u: FloatArray, tpr_u: FloatArray, n_neg: int, targets: FloatArray) -> FloatArray:
    out = np.interp(targets, fpr_u, tpr_u)
    # Below the curve's resolution (one false positive = 1/n_neg) interpolating toward the first
    # false positive would credit the attacker with a fraction of an error; use the TPR reached
    # with zero false positives instead (fpr_u[0] is always 0: roc_curve starts at (0, 0)).
    out[targets < 1.0 / n_neg] = tpr_u[0]
    return out


def tpr_at_fpr(labels: ArrayLike, scores: ArrayLike, fpr: float) -> float:
    """Attack TPR at a target FPR (labels 1 = member; higher score = more likely member).

    From sklearn's full ROC curve (keeping the best TPR at each distinct FPR):
    - target >= 1/n_nonmembers: linear interpolation between ROC operating points (exact at
      achievable FPRs k/n_nonmembers);
    - target < 1/n_nonmembers (e.g. 0.1% FPR with < 1000 non-members): no interpolation; the
      TPR at the most permissive threshold whose FPR <= target, i.e. with zero false positives.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    y, s = _check_labels_scores(labels, scores)
    fpr_u, tpr_u, n_neg = _roc_envelope(y, s)
    return float(_tpr_on(fpr_u, tpr_u, n_neg, np.array([fpr], dtype=np.float64))[0])


def roc_auc_with_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """ROC AUC and a percentile-bootstrap confidence interval: (auc, ci_low, ci_high).

    Members and non-members are resampled separately (stratified) so every replicate keeps the
    original class counts; the precomputed scores are resampled, nothing is refitted.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y, s = _check_labels_scores(labels, scores)
    auc = float(roc_auc_score(y, s))

    pos, neg = s[y == 1], s[y == 0]
    rng = _rng(seed, _STREAM_BOOTSTRAP)
    boot = np.concatenate(
        [
            pos[rng.integers(0, pos.size, size=(n_bootstrap, pos.size))],
            neg[rng.integers(0, neg.size, size=(n_bootstrap, neg.size))],
        ],
        axis=1,
    )
    # Mann-Whitney form of the AUC with average ranks for ties: identical to roc_auc_score,
    # but vectorised over all replicates at once.
    ranks = rankdata(boot, axis=1)
    aucs = (ranks[:, : pos.size].sum(axis=1) - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(aucs, [alpha, 1.0 - alpha])
    return auc, float(low), float(high)


def _summarise(
    name: str,
    member_scores: FloatArray,
    nonmember_scores: FloatArray,
    *,
    seed: int,
    n_bootstrap: int,
) -> AttackResult:
    """Reduce per-record scores to aggregates; the scores themselves are dropped here."""
    labels = np.r_[np.ones(member_scores.size), np.zeros(nonmember_scores.size)]
    scores = np.r_[member_scores, nonmember_scores]
    auc, low, high = roc_auc_with_ci(labels, scores, n_bootstrap=n_bootstrap, seed=seed)
    fpr_u, tpr_u, n_neg = _roc_envelope(labels, scores)
    grid = np.asarray(FPR_GRID)
    at = _tpr_on(fpr_u, tpr_u, n_neg, np.r_[grid, 0.01, 0.001])
    return AttackResult(
        name=name,
        auc=auc,
        auc_ci_low=low,
        auc_ci_high=high,
        tpr_at_1pct_fpr=float(at[-2]),
        tpr_at_01pct_fpr=float(at[-1]),
        n_members=int(member_scores.size),
        n_nonmembers=int(nonmember_scores.size),
        roc_fpr=FPR_GRID,
        roc_tpr=tuple(float(v) for v in at[: grid.size]),
    )


# ---------------------------------------------------------------------------- attacks
def _candidates(members: ArrayLike, nonmembers: ArrayLike, seed: int) -> tuple[FloatArray, FloatArray]:
    mem = _as_matrix(members, "members")
    non = _as_matrix(nonmembers, "nonmembers")
    _same_width(members=mem, nonmembers=non)
    # Balanced classes make AUC/TPR comparable across hospitals and attacks.
    return _balance(mem, non, _rng(seed, _STREAM_BALANCE))


def scott_bandwidth(x: FloatArray) -> float:
    # Scott's rule for an isotropic kernel: RMS feature std * n^(-1/(d+4)). Falls back to unit
    # scale (inputs are standardised) if the sample is degenerate, e.g. a mode-collapsed generator.
    n, d = x.shape
    sigma = float(np.sqrt(np.mean(np.var(x, axis=0))))
    return (sigma if sigma > 0 else 1.0) * n ** (-1.0 / (d + 4))


def gaussian_kde_logpdf(fit: FloatArray, query: FloatArray, bandwidth: float) -> FloatArray:
    """Exact log-density of an isotropic Gaussian KDE, evaluated blockwise.

    Brute force rather than sklearn's KernelDensity: its tree evaluation loses accuracy in the
    far tails in ~40 dimensions (errors of >10 nats observed), and DOMIAS scores live there.
    At audit sizes (<= a few thousand rows) this is one small matrix product per block.
    """
    n, d = fit.shape
    log_norm = np.log(n) + 0.5 * d * np.log(2.0 * np.pi * bandwidth**2)
    fit_sq = np.einsum("ij,ij->i", fit, fit)
    out = np.empty(len(query))
    for start in range(0, len(query), _KDE_BLOCK):
        q = query[start : start + _KDE_BLOCK]
        sq = np.einsum("ij,ij->i", q, q)[:, None] + fit_sq[None, :] - 2.0 * q @ fit.T
        np.maximum(sq, 0.0, out=sq)  # rounding can make tiny squared distances negative
        out[start : start + len(q)] = logsumexp(-sq / (2.0 * bandwidth**2), axis=1)
    return out - log_norm


def distance_attack(
    members: ArrayLike,
    nonmembers: ArrayLike,
    synthetic: ArrayLike,
    *,
    seed: int,
    n_bootstrap: int = 200,
) -> AttackResult:
    """Distance attack: score = -(Euclidean distance to the closest synthetic record).

    A generator that memorised a record emits something close to it, so members sit nearer
    the synthetic sample than non-members do.
    """
    mem, non = _candidates(members, nonmembers, seed)
    syn = _as_matrix(synthetic, "synthetic")
    _same_width(members=mem, synthetic=syn)
    scores = -nearest_distances(syn, np.vstack([mem, non]), k=1)[:, 0]
    return _summarise("distance", scores[: len(mem)], scores[len(mem) :], seed=seed, n_bootstrap=n_bootstrap)


def domias_attack(
    members: ArrayLike,
    nonmembers: ArrayLike,
    synthetic: ArrayLike,
    reference: ArrayLike,
    *,
    seed: int,
    n_bootstrap: int = 200,
    bandwidth: float | None = None,
) -> AttackResult:
    """DOMIAS-style density-ratio attack: score = log p_synthetic(x) - log p_reference(x).

    Both densities are Gaussian KDEs (isotropic; bandwidth by Scott's rule per sample unless
    given). Overfitting shows up as synthetic density that is high at training records relative
    to the population density, estimated from `reference`: real records from the same
    population that are neither members nor the non-member candidates.
    """
    mem, non = _candidates(members, nonmembers, seed)
    syn = _as_matrix(synthetic, "synthetic", min_rows=2)
    ref = _as_matrix(reference, "reference", min_rows=2)
    _same_width(members=mem, synthetic=syn, reference=ref)
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    cand = np.vstack([mem, non])
    log_syn = gaussian_kde_logpdf(syn, cand, bandwidth or scott_bandwidth(syn))
    log_ref = gaussian_kde_logpdf(ref, cand, bandwidth or scott_bandwidth(ref))
    scores = log_syn - log_ref
    return _summarise("domias", scores[: len(mem)], scores[len(mem) :], seed=seed, n_bootstrap=n_bootstrap)


def classifier_attack(
    members: ArrayLike,
    nonmembers: ArrayLike,
    synthetic: ArrayLike,
    reference: ArrayLike,
    *,
    seed: int,
    n_bootstrap: int = 200,
    n_estimators: int = 100,
) -> AttackResult:
    """Shadow-free classifier attack: P(synthetic | x) from a synthetic-vs-reference classifier.

    No shadow generators are trained: a classifier learns to tell the synthetic sample from
    `reference` (real population records, disjoint from the candidates) and each candidate is
    scored by its predicted probability of being synthetic. Records the generator memorised
    look synthetic. Fully grown extremely randomised trees are used because they can isolate
    individual synthetic rows (a smooth model only sees the overall distribution shift);
    classes are weighted so the synthetic/reference size ratio does not matter.
    """
    mem, non = _candidates(members, nonmembers, seed)
    syn = _as_matrix(synthetic, "synthetic")
    ref = _as_matrix(reference, "reference")
    _same_width(members=mem, synthetic=syn, reference=ref)
    model = ExtraTreesClassifier(
        n_estimators=n_estimators,
        class_weight="balanced",
        n_jobs=2,  # deterministic regardless: each tree's seed is fixed up front
        random_state=int(_rng(seed, _STREAM_MODEL).integers(2**31 - 1)),
    )
    model.fit(np.vstack([syn, ref]), np.r_[np.ones(len(syn)), np.zeros(len(ref))])
    scores = model.predict_proba(np.vstack([mem, non]))[:, 1]
    return _summarise(
        "classifier", scores[: len(mem)], scores[len(mem) :], seed=seed, n_bootstrap=n_bootstrap
    )


def run_membership_attacks(
    members: ArrayLike,
    nonmembers: ArrayLike,
    synthetic: ArrayLike,
    reference: ArrayLike,
    *,
    seed: int,
    n_bootstrap: int = 200,
) -> list[AttackResult]:
    """Run the distance, DOMIAS and classifier attacks on the same balanced candidate sets.

    members = this hospital's training records, nonmembers = its held-out records, reference =
    further real records (disjoint from both) standing in for the attacker's population sample.
    The larger candidate set is subsampled (seeded) to the smaller's size; the same seed picks
    the same rows in every attack.
    """
    return [
        distance_attack(members, nonmembers, synthetic, seed=seed, n_bootstrap=n_bootstrap),
        domias_attack(members, nonmembers, synthetic, reference, seed=seed, n_bootstrap=n_bootstrap),
        classifier_attack(members, nonmembers, synthetic, reference, seed=seed, n_bootstrap=n_bootstrap),
    ]
