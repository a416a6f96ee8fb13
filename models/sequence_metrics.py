"""TimeGAN-style fidelity of synthetic daily weeks against a hospital's real ones, as mergeable aggregates."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from configs.schema import CohortSchema

DEFAULT_LAGS: tuple[int, ...] = (1, 2)
# Share of each class the post-hoc classifier trains on; the rest is the held-out test set.
_TRAIN_SHARE = 0.8
# Tiny GRUs, small batches, a high learning rate: a few hundred steps each, about a second for
# 1000 + 1000 weeks of 7 x 5 on one CPU core, yet enough to tell moment-matched fakes (right
# per-day means and spreads, no carry-over between days) from real weeks.
DISCRIMINATIVE_EPOCHS = 30
PREDICTIVE_EPOCHS = 50


# ==================================================================== input checks
def _check_sequences(real: np.ndarray, synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both (n, length, channels) with the same (length, channels), finite, as float64."""
    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    for name, x in (("real", real), ("synthetic", synthetic)):
        if x.ndim != 3:
            raise ValueError(f"{name} sequences must be (patients, length, channels), got shape {x.shape}")
        if len(x) == 0:
            raise ValueError(f"{name} sequences are empty")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} sequences contain NaN or infinite values")
    if real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"real weeks {real.shape[1:]} and synthetic weeks {synthetic.shape[1:]} differ")
    return real, synthetic


def _channel_names(channels: Sequence[str] | None, n_channels: int) -> list[str]:
    if channels is None:
        return [f"channel{j}" for j in range(n_channels)]
    if len(channels) != n_channels:
        raise ValueError(f"{len(channels)} channel names for {n_channels} channels")
    return list(channels)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r, 0.0 where either side is constant: no linear link is detectable there, and the
    result must stay a finite float for a MetricRecord."""
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x**2).sum()) * float((y**2).sum()))
    if denominator <= 1e-12:
        return 0.0
    return float(np.clip((x * y).sum() / denominator, -1.0, 1.0))


# ==================================================================== marginal shape
def channel_ks_complement(
    real: np.ndarray, synthetic: np.ndarray, channels: Sequence[str]
) -> dict[str, float]:
    """Per channel, 1 - two-sample KS statistic on every day's value pooled over patients and days."""
    real, synthetic = _check_sequences(real, synthetic)
    names = _channel_names(channels, real.shape[2])
    return {
        name: float(1.0 - stats.ks_2samp(real[:, :, j].ravel(), synthetic[:, :, j].ravel()).statistic)
        for j, name in enumerate(names)
    }


# ==================================================================== post-hoc recurrent models
class _LastStepClassifier(nn.Module):
    """GRU over the week, a linear logit on the last hidden state (TimeGAN's post-hoc discriminator)."""

    def __init__(self, n_channels: int, hidden: int):
        super().__init__()
        self.rnn = nn.GRU(n_channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = self.rnn(x)
        return self.head(last[-1]).squeeze(-1)


class _NextDayPredictor(nn.Module):
    """GRU over the days seen so far, a sigmoid head for every channel of the next day ([0, 1] data)."""

    def __init__(self, n_channels: int, hidden: int):
        super().__init__()
        self.rnn = nn.GRU(n_channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return torch.sigmoid(self.head(out))


@contextlib.contextmanager
def _seeded_single_thread(seed: int) -> Iterator[None]:
    """Seeded weight init that leaves the caller's global torch stream where it was, on one thread.

    The nets are tiny (batches of 128-256 weeks x 7 days x 16 units): extra intra-op threads only add
    synchronisation, and on a busy host (federated training beside the metrics) the spinning
    threads made a 1 s fit take a minute. The caller's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


def discriminative_score(
    real: np.ndarray,
    synthetic: np.ndarray,
    *,
    seed: int,
    epochs: int = DISCRIMINATIVE_EPOCHS,
    hidden: int = 16,
    batch_size: int = 128,
    learning_rate: float = 2e-2,
) -> dict[str, float]:
    """|held-out accuracy - 0.5| of a small GRU trained to tell real weeks from synthetic ones.

    Both classes are cut to the smaller size (balanced, so 0.5 is chance) and split 80/20
    within each class. Returns the test counts too, so hospitals' accuracies merge by adding.
    """
    real, synthetic = _check_sequences(real, synthetic)
    rng = np.random.default_rng(seed)
    n = min(len(real), len(synthetic))
    n_train = round(_TRAIN_SHARE * n)
    if n_train < 1 or n - n_train < 1:
        raise ValueError(f"need enough weeks of each kind for a train and a test split, got {n}")
    parts = []
    for x in (real, synthetic):
        picked = x[rng.permutation(len(x))[:n]]
        parts.append((picked[:n_train], picked[n_train:]))
    (real_train, real_test), (syn_train, syn_test) = parts
    x_train = torch.from_numpy(np.concatenate([real_train, syn_train]).astype(np.float32))
    y_train = torch.cat([torch.ones(n_train), torch.zeros(n_train)])
    x_test = torch.from_numpy(np.concatenate([real_test, syn_test]).astype(np.float32))
    y_test = torch.cat([torch.ones(n - n_train), torch.zeros(n - n_train)])

    with _seeded_single_thread(seed):
        model = _LastStepClassifier(real.shape[2], hidden)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        shuffle = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in _batches(len(x_train), batch_size, shuffle):
                optimizer.zero_grad()
                F.binary_cross_entropy_with_logits(model(x_train[idx]), y_train[idx]).backward()
                optimizer.step()
        with torch.no_grad():
            correct = int(((model(x_test) > 0).float() == y_test).sum())
    n_test = len(y_test)
    accuracy = correct / n_test
    return {
        "score": float(abs(accuracy - 0.5)),
        "accuracy": float(accuracy),
        "n_test_correct": float(correct),
        "n_test": float(n_test),
    }


def predictive_score(
    real: np.ndarray,
    synthetic: np.ndarray,
    *,
    seed: int,
    epochs: int = PREDICTIVE_EPOCHS,
    hidden: int = 16,
    batch_size: int = 256,
    learning_rate: float = 2e-2,
) -> dict[str, float]:
    """Train on synthetic, test on real: a GRU predicts every channel of day t+1 from days 1..t,
    then its mean absolute error over all real (patient, day >= 2, channel) values.

    Returns the error sum and the value count, so hospitals' MAEs merge by adding.
    """
    real, synthetic = _check_sequences(real, synthetic)
    if real.shape[1] < 2:
        raise ValueError("one-step-ahead prediction needs weeks of at least 2 days")
    syn = torch.from_numpy(synthetic.astype(np.float32))
    with _seeded_single_thread(seed):
        model = _NextDayPredictor(real.shape[2], hidden)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        shuffle = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in _batches(len(syn), batch_size, shuffle):
                optimizer.zero_grad()
                batch = syn[idx]
                F.l1_loss(model(batch[:, :-1]), batch[:, 1:]).backward()
                optimizer.step()
        with torch.no_grad():
            x = torch.from_numpy(real.astype(np.float32))
            errors = (model(x[:, :-1]) - x[:, 1:]).abs().double()
    abs_error_sum = float(errors.sum())
    n_values = errors.numel()
    return {"mae": abs_error_sum / n_values, "abs_error_sum": abs_error_sum, "n_values": float(n_values)}


# ==================================================================== temporal structure
def _autocorrelation(x: np.ndarray, lag: int) -> float:
    """Pearson r between day t and day t + lag, pairs pooled over all patients and days."""
    return _pearson(x[:, :-lag].ravel(), x[:, lag:].ravel())


def autocorrelation_difference(
    real: np.ndarray,
    synthetic: np.ndarray,
    *,
    channels: Sequence[str] | None = None,
    lags: Sequence[int] = DEFAULT_LAGS,
) -> dict[str, Any]:
    """Lag-k autocorrelation per channel, real vs synthetic; "diff" is the mean |gap| over channels x lags.

    Pooling over patients keeps both between-patient persistence and day-to-day carry-over in
    the number, which is what a per-patient conditional generator has to reproduce.
    """
    real, synthetic = _check_sequences(real, synthetic)
    names = _channel_names(channels, real.shape[2])
    if not lags or any(not 1 <= k < real.shape[1] for k in lags):
        raise ValueError(f"lags must lie in 1..{real.shape[1] - 1}, got {list(lags)}")
    per_channel: dict[str, dict[str, float]] = {}
    gaps: list[float] = []
    for j, name in enumerate(names):
        values: dict[str, float] = {}
        for k in lags:
            r_real = _autocorrelation(real[:, :, j], k)
            r_syn = _autocorrelation(synthetic[:, :, j], k)
            values.update(
                {f"lag{k}/real": r_real, f"lag{k}/synthetic": r_syn, f"lag{k}/diff": abs(r_real - r_syn)}
            )
            gaps.append(abs(r_real - r_syn))
        per_channel[name] = values
    return {
        "diff": float(np.mean(gaps)),
        "per_channel": per_channel,
        "n_real": float(len(real)),
        "n_synthetic": float(len(synthetic)),
    }


# ==================================================================== static <-> sequence links
def link_pairs(schema: CohortSchema) -> tuple[tuple[str, str], ...]:
    """Every numeric static column with every channel, in schema order (none without a sequence).

    The rule reads the schema alone, never the rows: which links a cohort holds is for the metric to
    measure, so no pair is chosen by looking at the data, and a spurious link the generator invents
    between any profile value and any channel shows up as a gap too.
    """
    if schema.sequence is None:
        return ()
    numeric = [spec.name for spec in schema.columns if not spec.is_categorical]
    return tuple((column, channel.name) for column in numeric for channel in schema.sequence.channels)


def _static_numeric(frame: pd.DataFrame, column: str, side: str) -> np.ndarray:
    if column not in frame.columns:
        raise ValueError(f"{side} static table has no column '{column}'")
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{side} static column '{column}' is not numeric throughout")
    return values


def link_fidelity(
    real_static: pd.DataFrame,
    real_seq: np.ndarray,
    syn_static: pd.DataFrame,
    syn_seq: np.ndarray,
    *,
    pairs: Sequence[tuple[str, str]],
    channels: Sequence[str],
) -> dict[str, Any]:
    """Per (static column, channel) pair: Pearson r of the column with each patient's weekly mean of
    the channel, on real and on synthetic patients, and the absolute gap; "max_diff" over pairs.

    Row i of a static table must describe the patient of week i (encode with the static ids).
    """
    real_seq, syn_seq = _check_sequences(real_seq, syn_seq)
    names = _channel_names(channels, real_seq.shape[2])
    for side, static, seq in (("real", real_static, real_seq), ("synthetic", syn_static, syn_seq)):
        if len(static) != len(seq):
            raise ValueError(f"{side}: {len(static)} static rows for {len(seq)} weeks")
    if not pairs:
        raise ValueError("link_fidelity needs at least one (static column, channel) pair")
    # Correlation is invariant to the encoder's affine scaling, so scaled weeks give raw-unit r.
    real_means, syn_means = real_seq.mean(axis=1), syn_seq.mean(axis=1)
    links: dict[str, dict[str, float]] = {}
    for column, channel in pairs:
        if channel not in names:
            raise ValueError(f"unknown channel '{channel}' (channels: {names})")
        j = names.index(channel)
        r_real = _pearson(_static_numeric(real_static, column, "real"), real_means[:, j])
        r_syn = _pearson(_static_numeric(syn_static, column, "synthetic"), syn_means[:, j])
        links[f"{column}~{channel}"] = {"real": r_real, "synthetic": r_syn, "diff": abs(r_real - r_syn)}
    return {
        "links": links,
        "max_diff": max(link["diff"] for link in links.values()),
        "n_real": float(len(real_seq)),
        "n_synthetic": float(len(syn_seq)),
    }


# ==================================================================== everything, flat
def evaluate_sequences(
    real_seq: np.ndarray,
    syn_seq: np.ndarray,
    *,
    channels: Sequence[str],
    seed: int,
    real_static: pd.DataFrame | None = None,
    syn_static: pd.DataFrame | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    discriminative_epochs: int = DISCRIMINATIVE_EPOCHS,
    predictive_epochs: int = PREDICTIVE_EPOCHS,
) -> dict[str, float]:
    """Every metric above as one flat {name: float} dict (fits a Flower MetricRecord), with the counts
    that let a server merge hospitals: weeks on each side, test counts and error sums.

    Link metrics need both static tables and the (column, channel) pairs to score, e.g.
    `link_pairs(schema)`; without the tables they are left out.
    """
    if (real_static is None) != (syn_static is None):
        # One side alone would silently drop the link metrics: almost surely a wiring mistake.
        raise ValueError("pass both static tables (link metrics) or neither")
    if real_static is not None and not pairs:
        # No default: pairs named after one cohort's columns fail on every other schema.
        raise ValueError("static tables need the link pairs to score, e.g. link_pairs(schema)")
    real_seq, syn_seq = _check_sequences(real_seq, syn_seq)
    names = _channel_names(channels, real_seq.shape[2])
    out: dict[str, float] = {"n-real": float(len(real_seq)), "n-synthetic": float(len(syn_seq))}

    ks = channel_ks_complement(real_seq, syn_seq, names)
    out.update({f"ks/{name}": value for name, value in ks.items()})
    out["ks-mean"] = float(np.mean(list(ks.values())))

    disc = discriminative_score(real_seq, syn_seq, seed=seed, epochs=discriminative_epochs)
    out["discriminative"] = disc["score"]
    out["discriminative-accuracy"] = disc["accuracy"]
    out["discriminative-n-test-correct"] = disc["n_test_correct"]
    out["discriminative-n-test"] = disc["n_test"]

    pred = predictive_score(real_seq, syn_seq, seed=seed, epochs=predictive_epochs)
    out["predictive-mae"] = pred["mae"]
    out["predictive-abs-error-sum"] = pred["abs_error_sum"]
    out["predictive-n-values"] = pred["n_values"]

    auto = autocorrelation_difference(real_seq, syn_seq, channels=names)
    out["autocorr-diff"] = auto["diff"]
    for name, values in auto["per_channel"].items():
        out.update({f"autocorr/{name}/{key}": value for key, value in values.items()})

    if real_static is not None and syn_static is not None:
        link = link_fidelity(real_static, real_seq, syn_static, syn_seq, pairs=pairs, channels=names)
        for pair, values in link["links"].items():
            out.update({f"link/{pair}/{key}": value for key, value in values.items()})
        out["link-max-diff"] = link["max_diff"]
    return {key: float(value) for key, value in out.items()}
