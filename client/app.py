"""Flower ClientApp: a thin shell over the client tasks; only this side reads patient files."""

from __future__ import annotations

import json
import logging
import time
import warnings
import zlib
from collections import OrderedDict

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.audit import audit_release
from client.data import Cohort, CohortValidationError, load_cohort, split_holdout
from client.egress import egress_guard
from client.node import (
    NodeSettings,
    fresh_noise_seed,
    holdout_salt,
    ledger_lock,
    load_ledger,
    load_plan,
    node_settings,
    save_ledger,
    save_plan,
)
from client.refusals import log_refusal_detail, public_reason
from client.risk_evaluation import evaluation_release
from client.tasks import (
    fits_target,
    handshake_statistics,
    measure_round,
    measurement_plan,
    plan_noise_multiplier,
    plan_target_epsilon,
    train_round,
)
from configs import wire
from configs.settings import RunSettings, settings_from_run_config
from configs.wire import (
    AuditRequest,
    EvaluateRequest,
    HandshakeRequest,
    MeasureRequest,
    TrainRequest,
    WireError,
)
from models.encoder import EncoderError
from models.releases.base import ReleaseError
from models.releases.catalog import get_release
from privacy.ledger import BudgetExceededError, PrivacyLedger

logger = logging.getLogger(__name__)
# Opacus warns about its non-cryptographic RNG and hook details on every round; the choice is
# deliberate (see NodeSettings.reproducible_noise) and the warnings drown the useful log.
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Full backward hook.*")

app = ClientApp(mods=[egress_guard])

# Refusals a hospital makes on purpose: answered as an error reply with a clear reason.
_REFUSALS = (CohortValidationError, BudgetExceededError, EncoderError, WireError, ReleaseError)


def _setup(context: Context, message: Message) -> tuple[RunSettings, NodeSettings]:
    settings = settings_from_run_config(dict(context.run_config))
    node = node_settings(context, settings, _federation_id(message))
    torch.set_num_threads(settings.runtime.threads_per_client)
    return settings, node


def _split_cohort(settings: RunSettings, node: NodeSettings) -> tuple[Cohort, Cohort]:
    """Validated local data as (members, held-out non-members); only members are ever trained on."""
    schema = settings.load_schema()
    cohort = load_cohort(node.data_dir, schema)
    return split_holdout(
        cohort,
        share=settings.audit.holdout_share,
        id_column=schema.id_column,
        salt=holdout_salt(node, run_seed=settings.federation.seed),
    )


def _noise_seed(settings: RunSettings, node: NodeSettings, salt: int) -> int:
    """Seeded noise in simulation only (see NodeSettings.reproducible_noise); 64 fresh bits from
    `secrets` on a deployed node, so nobody can regenerate its DP noise."""
    if not node.reproducible_noise:
        return fresh_noise_seed()
    return settings.federation.seed * 100_003 + zlib.crc32(node.hospital.encode()) % 997 * 101 + salt


def _federation_id(message: Message) -> str:
    config = message.content.config_records.get(wire.CONFIG)
    return str(config.get(wire.FEDERATION_ID, "")) if config is not None else ""


def _refuse(message: Message, node: NodeSettings, err: Exception) -> Message:
    """An error reply naming file, line, column and problem class only; the detail stays in this log."""
    log_refusal_detail(logger, node.hospital, err, request=message.metadata.message_type)
    reason = public_reason(err, node.hospital)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def _node_info(node: NodeSettings, **extra: str) -> ConfigRecord:
    return ConfigRecord({"hospital": node.hospital, **extra})


@app.query("handshake")
def handshake(message: Message, context: Context) -> Message:
    """Validate the local cohort, then answer the DP releases asked for (charged to the ledger)."""
    settings, node = _setup(context, message)
    with ledger_lock(node):  # load, charge and save: one run at a time on this node
        schema = settings.load_schema()
        try:
            request = HandshakeRequest.from_config(message.content.config_records.get(wire.CONFIG))
            if request.schema_hash != schema.schema_hash():
                raise EncoderError("the server's cohort schema differs from this node's (schema hash)")
            cohort, _ = _split_cohort(settings, node)
            ledger = load_ledger(context, node)
            epsilon = settings.privacy.statistics_epsilon_share * node.max_epsilon
            released = handshake_statistics(
                cohort,
                schema,
                ledger=ledger,
                epsilon=epsilon,
                seed=_noise_seed(settings, node, 0),
                releases=request.releases,
            )
        except _REFUSALS as err:
            return _refuse(message, node, err)
        save_ledger(context, node, ledger)
        content = RecordDict(
            {
                **{
                    name: ArrayRecord({k: Array(v) for k, v in get_release(name).to_arrays(value).items()})
                    for name, value in released.items()
                },
                wire.METRICS: MetricRecord(
                    {
                        "epsilon": ledger.spent(),
                        "delta": node.delta,
                        "max-epsilon": node.max_epsilon,
                    }
                ),
                wire.NODE_INFO: _node_info(node, **{"schema-hash": schema.schema_hash()}),
            }
        )
        return Message(content, reply_to=message)


@app.train("generator")
@app.train("sequence")
@app.train("risk")
def train_model(message: Message, context: Context) -> Message:
    """One round of local DP-SGD on a registered model; refuses past the node's budget."""
    settings, node = _setup(context, message)
    with ledger_lock(node):  # load, charge and save: one run at a time on this node
        try:
            request = TrainRequest.from_config(message.content.config_records.get(wire.CONFIG))
            state = OrderedDict(message.content.array_records[wire.ARRAYS].to_torch_state_dict())
            cohort, _ = _split_cohort(settings, node)
            ledger = load_ledger(context, node)
            sigma = _noise_plan(context, node, ledger, cohort.n_patients, request, _federation_id(message))
            started = time.perf_counter()
            new_state, report = train_round(
                cohort,
                settings,
                request,
                state=state,
                ledger=ledger,
                noise_multiplier=float(sigma),
                device=node.device,
                seed=_noise_seed(settings, node, request.server_round),
            )
        except _REFUSALS as err:
            return _refuse(message, node, err)
        save_ledger(context, node, ledger)
        # Losses and step counts come from real records: they stay in this hospital's own log.
        logger.info("%s: %s round %d: %s", node.hospital, request.model, request.server_round, report)
        seconds = round((time.perf_counter() - started) / wire.TRAIN_SECONDS_STEP) * wire.TRAIN_SECONDS_STEP
        metrics = {"epsilon": ledger.spent(), wire.TRAIN_SECONDS: seconds}
        content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord(OrderedDict(new_state)),
                wire.METRICS: MetricRecord(metrics),
                wire.NODE_INFO: _node_info(node),
            }
        )
        return Message(content, reply_to=message)


def _noise_plan(
    context: Context,
    node: NodeSettings,
    ledger: PrivacyLedger,
    n_records: int,
    request: TrainRequest,
    federation_id: str,
) -> float:
    """Sigma for this round: planned at the model's first round, kept for the rest of the run.

    The plan (target epsilon, sigma) is stored with the ledger under the federation id, so a
    resumed run goes on with the same sigma. If a round was charged twice (the server crashed
    after the node trained it, and the resumed run asks again), sigma is re-spread so the rounds
    left still end at the same target: the budget split between models never moves.
    """
    key = f"plan.{federation_id}.{request.model}"
    plan = load_plan(context, node, key)
    if plan is None:
        target = plan_target_epsilon(ledger, request)
        plan = {
            "target": target,
            "sigma": plan_noise_multiplier(ledger, n_records=n_records, request=request),
        }
    elif fits_target(
        ledger, n_records=n_records, request=request, sigma=plan["sigma"], target=plan["target"]
    ):
        return float(plan["sigma"])  # unchanged: nothing to write
    else:
        sigma = plan_noise_multiplier(
            ledger, n_records=n_records, request=request, target_epsilon=plan["target"]
        )
        logger.warning(
            "%s: rounds left re-planned at sigma %.3f (a round was charged twice)", node.hospital, sigma
        )
        plan = {**plan, "sigma": sigma}
    save_plan(context, node, key, plan)
    return float(plan["sigma"])


@app.query("measure")
def measure(message: Message, context: Context) -> Message:
    """Noisy marginal tables for a statistics generator (one Gaussian release, charged)."""
    settings, node = _setup(context, message)
    with ledger_lock(node):  # load, charge and save: one run at a time on this node
        try:
            request = MeasureRequest.from_config(message.content.config_records.get(wire.CONFIG))
            cohort, _ = _split_cohort(settings, node)
            ledger = load_ledger(context, node)
            key = f"measure.{request.federation_id}.{request.model}"
            plan = measurement_plan(ledger, request, load_plan(context, node, key))
            save_plan(context, node, key, plan)  # before the charge: a crash after it never re-plans
            tables, z = measure_round(
                cohort,
                settings.load_schema(),
                request,
                ledger=ledger,
                rho=plan["rho"],
                seed=_noise_seed(settings, node, 1000 + request.round_index),
            )
        except _REFUSALS as err:
            return _refuse(message, node, err)
        save_ledger(context, node, ledger)
        content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in tables.items()}),
                # the noise multiplier follows from the declared budget alone: a public fact
                wire.METRICS: MetricRecord({"noise-multiplier": z, "epsilon": ledger.spent()}),
                wire.NODE_INFO: _node_info(node),
            }
        )
        return Message(content, reply_to=message)


@app.query("identify")
def identify(message: Message, context: Context) -> Message:
    """Which hospital this node is (for a resumed run): reads no patient data, spends no epsilon."""
    settings, node = _setup(context, message)
    return Message(
        RecordDict(
            {wire.NODE_INFO: _node_info(node, **{"schema-hash": settings.load_schema().schema_hash()})}
        ),
        reply_to=message,
    )


def _answer_once(context: Context, node: NodeSettings, what: str, federation_id: str) -> None:
    """Record, before any charge, that this node answers `what` of this federation; a second ask
    is refused (a repeated release would spend the budget again on the same patients)."""
    key = f"{what}.{federation_id}"
    if load_plan(context, node, key) is not None:
        raise WireError(f"this node answered the {what} of federation '{federation_id}' already")
    save_plan(context, node, key, {"answered": True})


def _ledger_reply(
    node: NodeSettings, ledger: PrivacyLedger, counts_key: str, arrays: dict, noise_sd: float
) -> RecordDict:
    """A one-off release's reply: the noisy arrays, the epsilon now, the noise sd and the charges."""
    return RecordDict(
        {
            counts_key: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            wire.METRICS: MetricRecord({"epsilon": ledger.spent(), "noise-sd": noise_sd}),
            # the charges themselves (mechanism, sigma, sample rate, steps, epsilon after)
            wire.LEDGER: ConfigRecord({"json": json.dumps([e.model_dump() for e in ledger.entries])}),
            wire.NODE_INFO: _node_info(node),
        }
    )


@app.query("audit")
def audit(message: Message, context: Context) -> Message:
    """The privacy audit, answered once per federation: noisy attack-score histograms (charged).

    The node draws its own synthetic sample from the generator the server sends (never rows
    from the server), so no reply can measure a patient against a probe the server chose.
    """
    settings, node = _setup(context, message)
    with ledger_lock(node):  # load, charge and save: one run at a time on this node
        try:
            request = AuditRequest.from_config(message.content.config_records.get(wire.CONFIG))
            if wire.MODEL not in message.content.array_records:
                raise WireError(f"the audit request has no '{wire.MODEL}' record")
            state = dict(message.content.array_records[wire.MODEL].to_torch_state_dict())
            members, holdout = _split_cohort(settings, node)
            ledger = load_ledger(context, node)
            _answer_once(context, node, "audit", request.federation_id)
            arrays, noise_sd = audit_release(
                members,
                holdout,
                settings.load_schema(),
                request,
                state,
                ledger=ledger,
                seed=_noise_seed(settings, node, 2000),
            )
        except _REFUSALS as err:
            return _refuse(message, node, err)
        save_ledger(context, node, ledger)
        return Message(_ledger_reply(node, ledger, wire.AUDIT_COUNTS, arrays, noise_sd), reply_to=message)


@app.query("evaluate")
def evaluate(message: Message, context: Context) -> Message:
    """The risk models scored on this node's held-out patients, answered once per federation:
    noisy confusion and score tables per model (one charged release); no prediction leaves."""
    settings, node = _setup(context, message)
    with ledger_lock(node):
        try:
            request = EvaluateRequest.from_config(message.content.config_records.get(wire.CONFIG))
            records = message.content.array_records
            states = {
                folder: dict(records[wire.RISK_MODEL_PREFIX + folder].to_torch_state_dict())
                for folder in request.models
                if wire.RISK_MODEL_PREFIX + folder in records
            }
            _, holdout = _split_cohort(settings, node)
            ledger = load_ledger(context, node)
            _answer_once(context, node, "risk evaluation", request.federation_id)
            arrays, noise_sd = evaluation_release(
                holdout,
                settings.load_schema(),
                request,
                states,
                ledger=ledger,
                seed=_noise_seed(settings, node, 3000),
            )
        except _REFUSALS as err:
            return _refuse(message, node, err)
        save_ledger(context, node, ledger)
        return Message(_ledger_reply(node, ledger, wire.RISK_COUNTS, arrays, noise_sd), reply_to=message)
