"""Run settings: typed pydantic models over the TOML defaults, with dotted overrides."""

from __future__ import annotations

import copy
import json
import math
import shlex
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs.errors import ConfigError, format_validation_error
from configs.plan import StageSpec, params_problems, plan_problems
from configs.schema import CohortSchema, load_schema, read_toml

DEFAULT_SETTINGS_PATH = Path(__file__).with_name("demo.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FederationSettings(_Section):
    hospitals: int = Field(ge=1, le=1000)
    patients: int = Field(ge=10)
    partition: Literal["iid", "non-iid"]
    dirichlet_alpha: float = Field(gt=0)
    local_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    seed: int = Field(ge=0)
    round_timeout_s: float = Field(gt=0)
    join_timeout_s: float = Field(gt=0)
    min_replies: int = Field(ge=1)
    # Public cap on one hospital's FedAvg weight (its DP count from the handshake histograms).
    max_hospital_weight: float = Field(ge=1, le=1e9)
    # An update farther than this times max(||global||_2, 1) from the round's global weights is
    # refused (strategies.validation); finite so one hospital cannot swamp the average.
    max_update_norm_ratio: float = Field(gt=0, le=1e6)


class PrivacySettings(_Section):
    # epsilon and delta are per hospital over the whole run (all charges composed).
    max_epsilon: float = Field(gt=0, le=100)
    delta: float = Field(gt=0, lt=1)
    clipping_norm: float = Field(gt=0)
    # Share of max_epsilon the handshake's DP statistics spend; each stage declares its own share.
    statistics_epsilon_share: float = Field(gt=0, lt=1)


class ModelSettings(_Section):
    """`[model.<name>]` tables: each model's parameters (validated by that model's own Config)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def params_for(self, name: str) -> dict[str, Any]:
        """The raw `[model.<name>]` table ({} when the file has none)."""
        extra = self.model_extra or {}
        value = extra.get(name, {})
        return dict(value) if isinstance(value, dict) else value

    def tables(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SADQCSettings(_Section):
    initial_threshold: float = Field(gt=0, le=1)
    min_threshold: float = Field(gt=0, le=1)
    tighten_factor: float = Field(gt=0)
    lr_decay: float = Field(gt=0, lt=1)
    min_lr_multiplier: float = Field(gt=0, le=1)
    patience: int = Field(ge=1)
    max_extra_local_epochs: int = Field(ge=0)
    contamination: float = Field(ge=0, lt=0.5)


class AuditSettings(_Section):
    holdout_share: float = Field(gt=0, lt=1)
    # Share of max_epsilon the audit's one Gaussian release spends (kept back from the stages).
    epsilon_share: float = Field(gt=0, lt=1)
    # After a failed audit the release goes to quarantine/ unless the operator sets this.
    release_on_fail: bool = False
    synthetic_rows: int = Field(ge=50, le=50_000)
    bootstrap: int = Field(ge=10)
    max_attack_auc: float = Field(ge=0, le=1)
    max_attack_auc_ci_high: float = Field(ge=0, le=1)
    max_tpr_at_1pct_fpr: float = Field(ge=0, le=1)
    min_dcr_protection: float = Field(ge=0, le=1)


class RuntimeSettings(_Section):
    device: Literal["auto", "cpu", "cuda"]
    threads_per_client: int = Field(ge=1, le=256)


class ExportSettings(_Section):
    synthetic_rows: int = Field(ge=1)
    round_sample_rows: int = Field(ge=10)


class RiskSettings(_Section):
    # Risk models the server trains on the released synthetic cohort (post-processing: no epsilon);
    # the federated DP route is a [[stages]] entry of a risk model.
    synthetic_models: list[str] = Field(default_factory=list)
    # Share of max_epsilon for the hospitals' one release of every risk model's confusion and
    # score tables on their held-out patients (after the audit); 0: no hospital-side evaluation.
    evaluation_epsilon_share: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _known_risk_models(self) -> RiskSettings:
        from models.base import ModelKind
        from models.registry import UnknownModelError, get_model_class

        for name in self.synthetic_models:
            try:
                kind = get_model_class(name).kind
            except UnknownModelError as err:
                raise ValueError(f"risk.synthetic_models: {err.args[0]}") from None
            if kind != ModelKind.RISK_MODEL:
                raise ValueError(f"risk.synthetic_models: '{name}' is not a risk model")
        return self


class RunSettings(_Section):
    """Every knob of a run, validated once at the boundary."""

    schema_path: Path = Field(alias="schema")
    federation: FederationSettings
    stages: list[StageSpec]
    privacy: PrivacySettings
    model: ModelSettings
    runtime: RuntimeSettings
    sadqc: SADQCSettings
    audit: AuditSettings
    export: ExportSettings
    risk: RiskSettings = RiskSettings()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check_plan(self) -> RunSettings:
        from models.registry import registered_models  # local: configs must not import torch early

        allowed = registered_models()
        for key, value in self.model.tables().items():
            if not isinstance(value, dict):
                raise ValueError(
                    f"model.{key} = {value!r}: models are chosen in the run plan ([[stages]] model = ...), "
                    f"and [model.<name>] holds a model's parameters; allowed models: {allowed}"
                )
        problems = plan_problems(
            self.stages,
            self.privacy.statistics_epsilon_share,
            self.model.tables(),
            kept_back={
                "audit": self.audit.epsilon_share,
                "risk evaluation": self.risk_evaluation_share,
            },
        )
        for name in sorted(set(self.model.tables()) - {stage.model for stage in self.stages}):
            if name in allowed:  # a registered model's table is checked even when no stage uses it
                problems += params_problems(name, self.model.params_for(name))
        problems += self._sequence_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _sequence_problems(self) -> list[str]:
        """A sequence stage with a schema that declares no [sequence]: refused here, with the way
        out, rather than by every hospital at the handshake (the moments it would ask for)."""
        from models.base import ModelKind
        from models.registry import UnknownModelError, get_model_class

        try:
            schema = self.load_schema()
        except ConfigError:
            return []  # the schema's own problems are reported where it is read
        if schema.sequence is not None:
            return []
        problems = []
        for stage in self.stages:
            try:
                kind = get_model_class(stage.model).kind
            except UnknownModelError:  # named by plan_problems
                continue
            if kind == ModelKind.SEQUENCE_GENERATOR:
                problems.append(
                    f"stage '{stage.model}' generates the schema's daily sequence, and {self.schema_path} "
                    f"declares no [sequence]: leave the stage out (stages.{stage.model}=false) or declare one"
                )
        return problems

    @property
    def risk_evaluation_share(self) -> float:
        """The risk evaluation's share of max epsilon: 0 when the plan trains no risk model."""
        from models.base import ModelKind
        from models.registry import UnknownModelError, get_model_class

        def is_risk(name: str) -> bool:
            try:
                return bool(get_model_class(name).kind == ModelKind.RISK_MODEL)
            except UnknownModelError:  # named by plan_problems
                return False

        federated = any(is_risk(stage.model) for stage in self.stages)
        return self.risk.evaluation_epsilon_share if federated or self.risk.synthetic_models else 0.0

    def load_schema(self) -> CohortSchema:
        return load_schema(self.schema_path)

    def to_toml_dict(self) -> dict[str, Any]:
        """The settings as a TOML-shaped dict (round-trips through `settings_from_dict`)."""
        data = self.model_dump(mode="json", by_alias=True)
        data["model"] = self.model.tables()
        return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` laid over `base`; a table over a list of stages addresses them by index or model."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, dict) and isinstance(merged.get(key), list):
            merged[key] = _merge_into_list(key, merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge_into_list(name: str, items: list[Any], overlay: dict[str, Any]) -> list[Any]:
    """`stages.0.rounds=2`, `stages.timegan.phases.joint=1`: the item by position or by model (as
    the overrides before it left it); `stages.timegan=false` leaves that item out."""
    dropped: set[int] = set()
    for key, value in overlay.items():
        models = [item.get("model") if isinstance(item, dict) else None for item in items]
        index = int(key) if key.isdigit() else (models.index(key) if key in models else None)
        if index is None or index >= len(items) or not (isinstance(value, dict) or value is False):
            raise ConfigError(
                f"override '{name}.{key}': no such entry (give a position 0-{len(items) - 1} or one of "
                f"{[m for m in models if m]}, then a key, e.g. {name}.0.rounds=3, or =false to leave it out)"
            )
        if value is False:
            dropped.add(index)
        else:
            items[index] = deep_merge(items[index], value)
    return [item for index, item in enumerate(items) if index not in dropped]


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a table")
        node[parts[-1]] = value
    return nested


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse "stages.timegan.phases.joint=3 privacy.max_epsilon=4.0" (values are TOML literals)."""
    dotted: dict[str, Any] = {}
    for item in shlex.split(text):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            dotted[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            dotted[key] = raw  # a bare word is taken as a string
    return dotted


def settings_from_dict(data: dict[str, Any], *, source: str, base_dir: Path) -> RunSettings:
    data = dict(data)
    schema = Path(data.get("schema", "cohort.toml"))
    data["schema"] = schema if schema.is_absolute() else (base_dir / schema)
    try:
        return RunSettings.model_validate(data)
    except ValueError as err:
        raise ConfigError(format_validation_error(err, source=source)) from None


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunSettings:
    """Load the defaults, lay a user file over them, then dotted overrides over that."""
    data = read_toml(DEFAULT_SETTINGS_PATH)
    source = str(DEFAULT_SETTINGS_PATH)
    base_dir = DEFAULT_SETTINGS_PATH.parent
    if path is not None and Path(path).resolve() != DEFAULT_SETTINGS_PATH.resolve():
        user = read_toml(path)
        unknown = sorted(set(user) - set(data))
        if unknown:
            raise ConfigError(f"{path}: unknown top-level keys {unknown}; allowed: {sorted(data)}")
        data = deep_merge(data, user)
        source = str(path)
        if "schema" in user:
            base_dir = Path(path).resolve().parent
    if overrides:
        data = deep_merge(data, _nest(overrides))
        source += " + overrides " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return settings_from_dict(data, source=source, base_dir=base_dir)


def settings_from_run_config(run_config: dict[str, Any], app_dir: Path | None = None) -> RunSettings:
    """Flower `run_config` (pyproject `[tool.flwr.app.config]` + --run-config) -> settings."""
    config_file = Path(str(run_config.get("config-file", "")) or DEFAULT_SETTINGS_PATH)
    if not config_file.is_absolute():
        # The app's own folder first: a deployed ServerApp/ClientApp inherits the working directory
        # of whatever started flower-superlink / flower-supernode, which may hold other files.
        roots = [Path(__file__).resolve().parent.parent, *([app_dir] if app_dir else []), Path.cwd()]
        candidates = [root / config_file for root in roots]
        config_file = next((c for c in candidates if c.exists()), candidates[0])
    overrides = parse_overrides(str(run_config.get("overrides", "")))
    return load_settings(config_file, overrides)


def format_overrides(dotted: dict[str, Any]) -> str:
    """Inverse of `parse_overrides`: values written as TOML literals."""
    return " ".join(shlex.quote(f"{key}={_toml_literal(value)}") for key, value in dotted.items())


def _toml_literal(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_toml_literal(str(k))} = {_toml_literal(v)}" for k, v in value.items()) + "}"
        )
    # JSON strings, numbers and booleans are TOML too, except DEL, which TOML wants escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
