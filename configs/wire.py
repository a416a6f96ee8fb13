"""The wire protocol shared by ServerApp and ClientApp: message names, record keys, typed requests."""

from __future__ import annotations

import json
import math
from typing import Any

from flwr.app import ConfigRecord, MetricRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# ---------------------------------------------------------------- message types
HANDSHAKE = "query.handshake"  # validate the cohort, answer the requested DP releases
IDENTIFY = "query.identify"  # which hospital a node is (a resumed run): no data read
AUDIT = "query.audit"  # DP histograms of membership-attack scores on the node's own synthetic sample
MEASURE = "query.measure"  # noisy marginal tables of the column sets a statistics generator chose
EVALUATE = "query.evaluate"  # DP count tables of the risk models' predictions on held-out patients
TRAIN_ACTIONS = ("generator", "sequence", "risk")  # `train.<action>`, one per kind of round model

# ---------------------------------------------------------------- record keys
CONFIG = "config"  # the request's ConfigRecord
ARRAYS = "arrays"  # model weights (train) in and out
METRICS = "metrics"  # a reply's MetricRecord
NODE_INFO = "node-info"  # a reply's ConfigRecord naming the hospital (a declared public fact)
LEDGER = "ledger"  # the audit reply's list of charges (mechanism, sigma, sample rate, steps)
MODEL = "model"  # the audit request's ArrayRecord: the static generator's sampler state
AUDIT_COUNTS = "audit-counts"  # the audit reply's noisy score histograms (and their public edges)
RISK_COUNTS = "risk-counts"  # the evaluation reply's noisy tables, "<model folder>.<table>"
RISK_MODEL_PREFIX = "risk-model."  # + a model folder: the evaluation request's model states
FEDERATION_ID = "federation-id"  # names one run across a crash and its resume
STATISTICS_PREFIX = "statistics."  # + a release's name: merged DP statistics sent to a stage

# ---------------------------------------------------------------- what a reply may carry
# Every value a hospital sends is one of these; `EGRESS` says which, per message and record, and
# the ClientApp's egress guard (client/egress.py) refuses to send a reply with anything else.
DP = "DP release, charged to the hospital's ledger"
PUBLIC = "declared public fact"
POST = "post-processing of DP outputs"
ANY_KEY = "*"  # every key of the record (array names follow the release or the model)
TRAIN = "train"  # the egress entry shared by every `train.<action>`

_NODE_INFO = {NODE_INFO: {"hospital": PUBLIC, "schema-hash": PUBLIC}}
# The ledger's epsilon is the hospital's own accounting of the declared plan. For DP-SGD it also
# reflects Opacus's sample rate 1 / ceil(n / batch size): n enters only on that coarse grid.
_EPSILON = {"epsilon": PUBLIC}
# A round's local training time, to 0.1 s: a function of the node's hardware and its step count,
# which the ledger's declared sample rate already fixes; no record's value moves it.
TRAIN_SECONDS = "train-seconds"
TRAIN_SECONDS_STEP = 0.1
EGRESS: dict[str, dict[str, dict[str, str]]] = {
    HANDSHAKE: {
        "histograms": {ANY_KEY: DP},
        "pairs": {ANY_KEY: DP},
        "numeric-moments": {ANY_KEY: DP},
        "sequence-moments": {ANY_KEY: DP},
        METRICS: {**_EPSILON, "delta": PUBLIC, "max-epsilon": PUBLIC},
        **_NODE_INFO,
    },
    TRAIN: {ARRAYS: {ANY_KEY: DP}, METRICS: {**_EPSILON, TRAIN_SECONDS: PUBLIC}, **_NODE_INFO},
    MEASURE: {ARRAYS: {ANY_KEY: DP}, METRICS: {**_EPSILON, "noise-multiplier": PUBLIC}, **_NODE_INFO},
    IDENTIFY: _NODE_INFO,
    AUDIT: {
        # "<attack>": noisy counts; "<attack>.edges": quantiles of the node's own synthetic sample
        AUDIT_COUNTS: {ANY_KEY: DP},
        METRICS: {**_EPSILON, "noise-sd": PUBLIC},
        LEDGER: {"json": PUBLIC},  # the charges: mechanism, sigma, sample rate, steps, epsilon
        **_NODE_INFO,
    },
    EVALUATE: {
        RISK_COUNTS: {ANY_KEY: DP},  # confusion and flagged-score counts per model, one release
        METRICS: {**_EPSILON, "noise-sd": PUBLIC},
        LEDGER: {"json": PUBLIC},
        **_NODE_INFO,
    },
}


def egress_entry(message_type: str) -> dict[str, dict[str, str]] | None:
    """The classification of a reply to `message_type` (every `train.*` shares one)."""
    return EGRESS.get(TRAIN if message_type.startswith(TRAIN + ".") else message_type)


class WireError(ValueError):
    """A message does not follow the protocol (missing or mistyped entry), named by its key."""


def finite_metric(metrics: MetricRecord, key: str) -> float:
    """A reply's metric as a float; WireError unless it is there and a finite number (not a bool)."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WireError(f"'{key}' is {value!r}, not a finite number")
    return float(value)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    def to_config(self) -> ConfigRecord:
        """The request as a ConfigRecord under the wire's key names."""
        data = self.model_dump(by_alias=True, exclude={"statistics"}, exclude_none=True)
        data = {key: json.dumps(value) if isinstance(value, dict) else value for key, value in data.items()}
        return ConfigRecord(data)

    @classmethod
    def from_config(cls, config: ConfigRecord | None) -> Any:
        """Parse and check a ConfigRecord; a WireError names the first bad key."""
        if config is None:
            raise WireError(f"the message has no '{CONFIG}' record")
        try:
            return cls.model_validate(dict(config))
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(map(str, first["loc"])) or "?"
            raise WireError(f"config entry '{key}': {first['msg']}") from None


class HandshakeRequest(_Request):
    """Phase 1: validate the cohort against this schema and release these DP statistics."""

    schema_hash: str = Field(alias="schema-hash")
    releases: list[str]
    federation_id: str = Field(default="", alias=FEDERATION_ID)


class MeasureRequest(_Request):
    """One measurement round of a statistics generator: noisy tables of these column sets.

    `weights` is the public split of the model's budget over its rounds (known from the start, so a
    hospital plans its noise once); `budget_share` its share of the epsilon left at its first round.
    """

    model: str
    cliques: list[str]  # column names joined by "|", each a table to measure
    round_index: int = Field(alias="round-index", ge=1)
    weights: list[float] = Field(min_length=1)
    budget_share: float = Field(alias="budget-share", ge=0, le=1)
    federation_id: str = Field(default="", alias=FEDERATION_ID)
    # most cells of each multi-column table this round (coarser numeric bins); None: the default
    table_cells: int | None = Field(default=None, alias="table-cells", ge=4)

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not all(w > 0 for w in value):
            raise ValueError("every round's weight must be positive")
        return value

    @model_validator(mode="after")
    def _round_in_plan(self) -> MeasureRequest:
        if self.round_index > len(self.weights):
            raise ValueError(f"round {self.round_index} of a {len(self.weights)}-round plan")
        return self


class _ModelRequest(_Request):
    """A request about one registered model: its name, parameters and the server's encoder."""

    model: str
    model_params: dict[str, Any] = Field(alias="model-params")
    encoder_json: str = Field(alias="encoder")
    encoder_hash: str = Field(alias="encoder-hash")

    @field_validator("model_params", mode="before")
    @classmethod
    def _params_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"not JSON: {err}") from None
        return value


class AuditRequest(_ModelRequest):
    """The privacy audit: the node draws its own sample from this generator and answers once.

    The request carries the model (the `MODEL` ArrayRecord), never rows: a server cannot probe a
    patient by sending that patient's row back as "synthetic data".
    """

    rows: int = Field(ge=50, le=50_000)  # drawn twice: the attacks' sample and the bins' reference
    # The same public seed at every hospital: the same sample, so the same bins, and the server
    # can add the hospitals' noisy counts up. The noise is the node's own.
    sample_seed: int = Field(alias="sample-seed", ge=0)
    budget_share: float = Field(alias="budget-share", gt=0, le=1)  # of the epsilon left now
    federation_id: str = Field(default="", alias=FEDERATION_ID)


class EvaluateRequest(_Request):
    """The risk models' evaluation: each model (its state in `RISK_MODEL_PREFIX + folder`) scores
    the node's held-out patients, which answers once with noisy count tables."""

    models: dict[str, tuple[str, dict[str, Any]]]  # folder -> (registered name, parameters)
    encoder_json: str = Field(alias="encoder")
    encoder_hash: str = Field(alias="encoder-hash")
    budget_share: float = Field(alias="budget-share", gt=0, le=1)  # of the epsilon left now
    federation_id: str = Field(default="", alias=FEDERATION_ID)

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"not JSON: {err}") from None
        if isinstance(value, dict) and not value:
            raise ValueError("names no model")
        return value


class TrainRequest(_ModelRequest):
    """One round of local training, as the server asks for it (checked before anything runs)."""

    phase: str = ""  # a phased model's phase; "" otherwise
    model_rounds: int = Field(alias="model-rounds", ge=1)  # this model's rounds over all its phases
    rounds_before: int = Field(alias="rounds-before", ge=0)  # of this model, in earlier phases
    budget_share: float = Field(alias="budget-share", ge=0, le=1)  # of the epsilon left at its start
    local_epochs: int = Field(alias="local-epochs", ge=1)
    batch_size: int = Field(alias="batch-size", ge=1)
    seed: int
    federation_id: str = Field(default="", alias=FEDERATION_ID)
    server_round: int = Field(default=1, alias="server-round", ge=1)  # set by the strategy
    lr_multiplier: float = Field(default=1.0, alias="lr-multiplier", gt=0)  # SA-DQC's after a rollback
    proximal_mu: float = Field(default=0.0, alias="proximal-mu", ge=0)  # set by Flower's FedProx
    stand_ins: bytes = Field(default=b"", alias="stand-ins")  # .npy of DP static samples (sequence)
    # release name -> .npz of the merged DP statistic (see `models.releases`); not a model input key
    statistics: dict[str, bytes] = Field(default_factory=dict)

    @property
    def rounds_remaining(self) -> int:
        """This model's rounds still to run, this one included: what its noise is planned over."""
        return self.model_rounds - self.rounds_before - self.server_round + 1

    def to_config(self) -> ConfigRecord:
        config = super().to_config()
        for name, data in self.statistics.items():
            config[STATISTICS_PREFIX + name] = data
        return config

    @classmethod
    def from_config(cls, config: ConfigRecord | None) -> TrainRequest:
        request: TrainRequest = super().from_config(config)
        assert config is not None
        statistics = {}
        for key, value in config.items():
            if key.startswith(STATISTICS_PREFIX):
                if not isinstance(value, bytes):
                    raise WireError(f"config entry '{key}' must be bytes, got {type(value).__name__}")
                statistics[key.removeprefix(STATISTICS_PREFIX)] = value
        if request.rounds_remaining < 1:
            raise WireError(
                f"config entries 'model-rounds', 'rounds-before', 'server-round' leave "
                f"{request.rounds_remaining} rounds; at least 1 is needed"
            )
        return request.model_copy(update={"statistics": statistics})
