"""What a risk model reads from `LocalData`: profile features without the label, targets, week summaries."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import BaseModel

from models.base import LocalData
from models.encoder import EncoderError, TabularEncoder
from models.sequence.encoder import SequenceEncoder

# Class weights are capped so a class the DP counts put near zero cannot dominate the loss.
MAX_CLASS_WEIGHT = 5.0


class RiskInputs:
    """What every risk model reads off the encoder and its config: the label's block and classes,
    and whether (and how many channels of) the week it uses."""

    Config: ClassVar[type[BaseModel]]

    def _read_inputs(self, encoder: TabularEncoder, config: BaseModel | dict | None) -> None:
        self.encoder = encoder
        self.config: Any = config if isinstance(config, self.Config) else self.Config(**(config or {}))
        self.label = label_slice(encoder)
        sequence = encoder.schema.sequence
        self.uses_week: bool = self.config.use_week and sequence is not None
        self.n_channels = len(sequence.channels) if sequence is not None else 0
        self.classes = list(encoder.schema.column(encoder.schema.label_column).categories or ())


def label_slice(encoder: TabularEncoder) -> slice:
    """The label column's one-hot block in the encoded profile."""
    label = encoder.schema.label_column
    block = next((b for b in encoder.blocks if b.name == label), None)
    if block is None or block.kind != "categorical":
        raise EncoderError(f"label column '{label}' must be a categorical column of the schema")
    return slice(block.start, block.start + block.width)


def profile_features(profiles: np.ndarray, label: slice) -> np.ndarray:
    """The encoded profile without the label block (a model must not see its target)."""
    return np.delete(profiles, np.r_[label], axis=1).astype(np.float32)


def targets(profiles: np.ndarray, label: slice) -> np.ndarray:
    """Class index of each row's label."""
    return profiles[:, label].argmax(axis=1).astype(np.int64)


def balanced_weights(class_shares: np.ndarray) -> np.ndarray:
    """Per-class loss weights 1 / (K p_k), so every class weighs the same in expectation.

    Under DP the shares come from the handshake's noisy label histogram (public), never from a
    count of the batch: Poisson sampling stays uniform and the weights cost no epsilon.
    """
    shares = np.clip(np.asarray(class_shares, dtype=np.float64), 1e-6, None)
    shares = shares / shares.sum()
    return np.clip(1.0 / (len(shares) * shares), 1.0 / MAX_CLASS_WEIGHT, MAX_CLASS_WEIGHT).astype(np.float32)


def prior_corrected(probabilities: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """Probabilities of a model trained with class weights w_k, mapped back to the training
    prevalence: such a model learns q_k proportional to w_k p(k | x), so p = (q / w) normalised."""
    unweighted = probabilities / np.asarray(class_weights, dtype=np.float64)
    return unweighted / np.clip(unweighted.sum(axis=1, keepdims=True), 1e-12, None)


SUMMARIES_PER_CHANNEL = 4  # mean, spread, lowest and highest day


def week_summaries(weeks: np.ndarray | None, rows: int) -> np.ndarray:
    """Per channel: the week's mean, spread, lowest and highest day ((rows, 0) without weeks)."""
    if weeks is None:
        return np.zeros((rows, 0), dtype=np.float32)
    return np.concatenate(
        [weeks.mean(axis=1), weeks.std(axis=1), weeks.min(axis=1), weeks.max(axis=1)], axis=1
    ).astype(np.float32)


def checked_weeks(data: LocalData, uses_week: bool, n_channels: int) -> np.ndarray | None:
    """The weeks a model that `uses_week` needs, checked against the rows and channels it was built for."""
    if not uses_week:
        return None
    if data.weeks is None:
        raise EncoderError("this risk model reads the week, but no weeks were given")
    if data.weeks.ndim != 3 or len(data.weeks) != len(data.profiles) or data.weeks.shape[2] != n_channels:
        raise EncoderError(
            f"weeks of shape {data.weeks.shape} do not fit {len(data.profiles)} profiles and "
            f"{n_channels} channels"
        )
    return data.weeks.astype(np.float32)


def encode_patients(
    encoder: TabularEncoder, static: pd.DataFrame, timeseries: pd.DataFrame | None
) -> LocalData:
    """Patients' rows as a risk model reads them; a frame without the label gets a placeholder there
    (models never read the label block when predicting)."""
    schema = encoder.schema
    if schema.label_column not in static.columns:
        static = static.assign(
            **{schema.label_column: (schema.column(schema.label_column).categories or [""])[0]}
        )
    weeks = None
    if schema.sequence is not None and timeseries is not None:
        weeks = SequenceEncoder.from_schema(schema).transform(timeseries, static[schema.id_column])
    return LocalData(profiles=encoder.transform(static), weeks=weeks)
