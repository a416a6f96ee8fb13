"""The phases of a federated run over Flower's Grid: handshake, training, synthesis, export."""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.progress import Progress

from configs.schema import CohortSchema
from configs.settings import RunSettings
from models.bundle import sample_linked
from models.encoder import TabularEncoder
from models.numeric_moments import NUMERIC_KEY, numeric_correlations, numeric_products_problem
from models.pairs import merge_pair_counts, pair_counts_problem
from models.registry import get_model_class
from models.statistics import Histograms, merge_histograms
from models.timegan import SequenceEncoder, SequenceMoments, encode_stand_ins
from privacy.storage import atomic_write_text
from server.audit import (
    check_aggregate_only,
    gates_from,
    merge_sequence_metrics,
    render_report,
    request_audit,
    save_audit_inputs,
)
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    RunProgress,
    flat_settings,
    ledger_summaries,
    now_iso,
    resumable_checkpoint,
    round_log_dicts,
    save_checkpoint,
)
from server.export import HospitalSummary, export_run
from server.sadqc import SADQC, QualityScores, SADQCConfig, filter_anomalies, score_sample
from strategies.fedavg import FEDERATION_ID, RoundLog, ValidatedFedAvg, hospital_of

logger = logging.getLogger(__name__)


class HandshakeError(RuntimeError):
    """No hospital passed the handshake: nothing can be trained, nothing is written."""


@dataclass
class HandshakeResult:
    node_ids: list[int]
    hospitals: dict[int, HospitalSummary]
    reference: Histograms
    refusals: list[dict[str, Any]] = field(default_factory=list)
    moments: SequenceMoments | None = None  # merged DP sequence moments, when a sequence model runs
    reference_pairs: Histograms = field(default_factory=dict)  # merged DP pair tables
    # merged DP sums of a a^T, a = (numeric columns, 1) (`models.numeric_moments`); None: none sent
    numeric: np.ndarray | None = None


def wait_for_nodes(grid: Grid, *, wanted: int, minimum: int, timeout_s: float) -> list[int]:
    """Wait until `wanted` nodes are connected, or `timeout_s`, then go on with >= minimum."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(nodes) < minimum:
        raise RuntimeError(
            f"only {len(nodes)} node(s) connected after {timeout_s:.0f}s; at least {minimum} needed"
        )
    return nodes


def _histograms_problem(record: ArrayRecord, schema: CohortSchema) -> str | None:
    """Shape and finiteness check on a hospital's DP histograms before they are merged."""
    for spec in schema.columns:
        if spec.name not in record:
            return f"histogram of '{spec.name}' is missing"
        counts = record[spec.name].numpy()
        if counts.shape != (spec.n_cells(),) or not np.isfinite(counts).all():
            return f"histogram of '{spec.name}' is malformed (shape {counts.shape})"
    return None


def _pairs_problem(reply: Message, schema: CohortSchema) -> str | None:
    if "pairs" not in reply.content.array_records:
        return "pair tables are missing"
    tables = {k: v.numpy() for k, v in reply.content.array_records["pairs"].items()}
    return pair_counts_problem(tables, schema)


def _numeric_of(reply: Message, schema: CohortSchema) -> np.ndarray | str:
    """A hospital's DP numeric moments, or why they cannot be used."""
    record = reply.content.array_records.get("numeric")
    if record is None or NUMERIC_KEY not in record:
        return "numeric moments are missing"
    products = record[NUMERIC_KEY].numpy().astype(np.float64)
    problem = numeric_products_problem(products, schema)
    return products if problem is None else problem


def _moments_of(reply: Message, schema: CohortSchema) -> SequenceMoments | str:
    """A hospital's DP sequence moments, or why they cannot be used."""
    if "moments" not in reply.content.config_records:
        return "sequence moments are missing"
    try:
        moments = SequenceMoments.from_json(str(reply.content.config_records["moments"]["json"]))
    except (ValueError, KeyError, TypeError) as err:
        return f"sequence moments are malformed: {err}"
    assert schema.sequence is not None
    problem = moments.problem(schema.sequence.length, SequenceEncoder.from_schema(schema).day_sd)
    return moments if problem is None else problem


def run_handshake(
    grid: Grid,
    node_ids: list[int],
    schema: CohortSchema,
    timeout_s: float,
    *,
    with_moments: bool = False,
    federation_id: str = "",
) -> HandshakeResult:
    """Phase 1: every node validates its data and answers counts + DP histograms (+ DP moments)."""
    config = ConfigRecord(
        {"schema-hash": schema.schema_hash(), "with-moments": with_moments, FEDERATION_ID: federation_id}
    )
    content = RecordDict({"config": config})
    messages = [Message(content, dst_node_id=n, message_type="query.handshake") for n in node_ids]
    # Sorted by hospital so the merged float sums (and the encoder hash) repeat run to run.
    replies = sorted(grid.send_and_receive(messages, timeout=timeout_s), key=hospital_of)
    accepted: list[int] = []
    hospitals: dict[int, HospitalSummary] = {}
    parts: list[Histograms] = []
    pair_parts: list[Histograms] = []
    moments: SequenceMoments | None = None
    numeric: np.ndarray | None = None
    refusals: list[dict[str, Any]] = []
    for reply in replies:
        node, hospital = reply.metadata.src_node_id, hospital_of(reply)
        part_moments: SequenceMoments | str | None = None
        part_numeric: np.ndarray | str | None = None
        if reply.has_error():
            problem = reply.error.reason
        else:
            problem = _histograms_problem(reply.content.array_records["histograms"], schema)
            if problem is None:
                problem = _pairs_problem(reply, schema)
            if problem is None:
                part_numeric = _numeric_of(reply, schema)
                problem = part_numeric if isinstance(part_numeric, str) else None
            if problem is None and with_moments:
                part_moments = _moments_of(reply, schema)
                problem = part_moments if isinstance(part_moments, str) else None
        if problem is not None:
            logger.warning("handshake: %s (node %d) left out: %s", hospital, node, problem)
            refusals.append({"hospital": hospital, "node": node, "reason": problem})
            continue
        metrics = reply.content.metric_records["metrics"]
        hospitals[node] = HospitalSummary(
            hospital=hospital,
            num_examples=int(metrics["num-examples"]),
            epsilon=float(metrics["epsilon"]),
            delta=float(metrics["delta"]),
            max_epsilon=float(metrics["max-epsilon"]),
        )
        parts.append({k: v.numpy() for k, v in reply.content.array_records["histograms"].items()})
        pair_parts.append({k: v.numpy() for k, v in reply.content.array_records["pairs"].items()})
        if isinstance(part_moments, SequenceMoments):
            moments = part_moments if moments is None else moments.merged(part_moments)
        if isinstance(part_numeric, np.ndarray):  # always, once the reply passed the checks
            numeric = part_numeric if numeric is None else numeric + part_numeric
        accepted.append(node)
    silent = sorted(set(node_ids) - {r.metadata.src_node_id for r in replies})
    for node in silent:
        refusals.append({"hospital": f"node-{node}", "node": node, "reason": "no answer before timeout"})
    if not accepted:
        reasons = "; ".join(f"{r['hospital']}: {r['reason']}" for r in refusals) or "no replies"
        raise HandshakeError(f"no hospital passed the handshake: {reasons}")
    return HandshakeResult(
        accepted,
        hospitals,
        merge_histograms(parts),
        refusals,
        moments,
        merge_pair_counts(pair_parts),
        numeric,
    )


@dataclass
class Stage:
    """A run of federated rounds for one model (and one TimeGAN phase)."""

    model: Any
    action: str  # client train action: "generator" or "sequence"
    rounds: int
    label: str
    # server-side quality after a round (DP references only); stages with a controller use `quality`
    score: Callable[[int], float] | None = None
    phase: str = ""
    rounds_before: int = 0  # rounds of this model in earlier stages
    model_rounds: int = 0  # rounds of this model over all its stages
    budget_share: float = 1.0  # share of each hospital's remaining epsilon this model may use
    extra_config: dict[str, Any] = field(default_factory=dict)
    # Config made when the stage starts, from what earlier stages trained (post-processing only).
    late_config: Callable[[], dict[str, Any]] | None = None
    # SA-DQC: full quality scores per round, and the controller that decides on them.
    quality: Callable[[int], QualityScores] | None = None
    controller: SADQC | None = None


@dataclass
class StageOutcome:
    rounds: list[RoundLog]
    scores: dict[int, float]


def table_quality(
    model: Any, handshake: HandshakeResult, settings: RunSettings
) -> Callable[[int], QualityScores]:
    """SA-DQC scores of a synthetic sample vs the DP histograms and DP pair tables."""

    def quality(server_round: int) -> QualityScores:
        sample = model.sample(settings.export.round_sample_rows, seed=settings.federation.seed + server_round)
        return score_sample(sample, handshake.reference, handshake.reference_pairs, model.encoder.schema)

    return quality


def sequence_scorer(
    model: Any, profiles: Callable[[], np.ndarray], reference: SequenceMoments
) -> Callable[[int], float]:
    """1 - mean |gap| of per-(day, channel) means and stds vs the DP sequence moments ([0, 1] scale).

    `profiles` is first called at the first score, when the static generator is trained (plan_stages
    caches its draw).
    """
    ref_mean, ref_std = reference.mean_std()

    def score(server_round: int) -> float:
        weeks = model.sample_encoded(profiles(), seed=server_round)
        mean, std = SequenceMoments.of(weeks).mean_std()
        return float(1.0 - np.abs(mean - ref_mean).mean() - np.abs(std - ref_std).mean())

    return score


def _stage_config(
    stage: Stage, encoder: TabularEncoder, settings: RunSettings, federation_id: str
) -> ConfigRecord:
    fed = settings.federation
    return ConfigRecord(
        {
            "model": stage.model.registry_name,
            "model-params": json.dumps(stage.model.config.model_dump(mode="json")),
            "encoder": encoder.to_json(),
            "encoder-hash": encoder.hash,
            "phase": stage.phase,
            "model-rounds": stage.model_rounds or stage.rounds,
            "rounds-before": stage.rounds_before,
            "budget-share": stage.budget_share,
            "local-epochs": fed.local_epochs,
            "batch-size": fed.batch_size,
            "seed": fed.seed,
            FEDERATION_ID: federation_id,
            **stage.extra_config,
            **(stage.late_config() if stage.late_config is not None else {}),
        }
    )


@dataclass
class StageStart:
    """Where a stage's rounds begin: round 1 from the model's weights, or mid-way from a checkpoint."""

    first_round: int = 1
    arrays: ArrayRecord | None = None  # what round `first_round` is sent (None: the model's weights)
    best: ArrayRecord | None = None  # the controller's best round so far
    scores: dict[int, float] = field(default_factory=dict)
    logs: list[RoundLog] = field(default_factory=list)


# after_round(stage, server_round, next_arrays, best_arrays, logs, scores): the checkpoint hook.
AfterRound = Callable[[Stage, int, ArrayRecord, ArrayRecord | None, list[RoundLog], dict[int, float]], None]


def run_stage(
    grid: Grid,
    stage: Stage,
    *,
    encoder: TabularEncoder,
    settings: RunSettings,
    participants: set[int],
    progress: Progress,
    task: Any,
    federation_id: str = "",
    start: StageStart | None = None,
    after_round: AfterRound | None = None,
    hospital_names: dict[int, str] | None = None,
) -> StageOutcome:
    """Flower's strategy loop for one stage; the model ends holding its best (or last) weights.

    `after_round` is called once every round is complete (aggregated, scored, the controller's
    decision taken) with the weights the next round will be sent: the server checkpoints there.
    """
    fed = settings.federation
    start = start or StageStart()
    strategy = ValidatedFedAvg(
        action=stage.action,
        min_replies=fed.min_replies,
        quorum_timeout_s=fed.round_timeout_s,
    )
    strategy.participants = participants
    strategy.hospital_names = hospital_names or {}
    strategy.rounds = list(start.logs)

    train_config = _stage_config(stage, encoder, settings, federation_id)
    initial = start.arrays if start.arrays is not None else ArrayRecord(stage.model.state_dict())
    # The controller's best round so far; before any, the starting weights are the fallback.
    best: dict[str, Any] = {"arrays": start.best if start.best is not None else initial}
    scores = dict(start.scores)
    if stage.controller is not None:
        train_config["lr-multiplier"] = float(stage.controller.training_overrides()["lr_multiplier"])

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        stage.model.load_state_dict(arrays.to_torch_state_dict())
        if stage.quality is not None and stage.controller is not None:
            decision = stage.controller.observe_round(server_round, stage.quality(server_round))
            score = decision.scores.overall if decision.scores else float("nan")
            logger.info(
                "SA-DQC %s round %d: %s (%s)", stage.label, server_round, decision.action, decision.reason
            )
            if decision.action == "accept":
                best["arrays"] = arrays
            elif decision.action == "rollback":
                strategy.override_arrays = best["arrays"]
            train_config["lr-multiplier"] = float(stage.controller.training_overrides()["lr_multiplier"])
        else:
            assert stage.score is not None, f"stage {stage.label} has neither a controller nor a score"
            score = stage.score(server_round)
        scores[server_round] = score
        logger.info("%s round %d: quality score %.4f", stage.label, server_round, score)
        progress.update(task, advance=1, description=f"{stage.label} round {server_round}: {score:.3f}")
        return MetricRecord({"score": score})

    def round_done(server_round: int, next_arrays: ArrayRecord) -> None:
        for log in strategy.rounds:
            log.stage = stage.label
        if after_round is not None:
            best_arrays = best["arrays"] if stage.controller is not None else None
            after_round(stage, server_round, next_arrays, best_arrays, strategy.rounds, scores)

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=stage.rounds,
        timeout=fed.round_timeout_s,
        train_config=train_config,
        evaluate_fn=evaluate,
        first_round=start.first_round,
        after_round=round_done,
    )
    check_stage_trained(stage.label, strategy.rounds)
    final = best["arrays"] if stage.controller is not None else result.arrays
    if len(final) > 0:  # the controller's best round, else the last aggregate
        stage.model.load_state_dict(final.to_torch_state_dict())
    return StageOutcome(strategy.rounds, scores)


class StageError(RuntimeError):
    """A stage ran its rounds but no hospital's update was ever aggregated: nothing was trained."""


def check_stage_trained(label: str, rounds: list[RoundLog]) -> None:
    """Refuse to go on (and export) with a model no round updated, naming the refusals.

    A round without enough valid updates keeps the global model as it was; if that happens in
    every round of a stage, the model is still its random initialisation.
    """
    if not rounds or any(log.aggregated for log in rounds):
        return
    reasons = sorted(
        {f"{r.get('hospital', '?')}: {r.get('reason', '?')}" for log in rounds for r in log.rejected}
    )
    shown = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
    raise StageError(
        f"{label}: no round aggregated any hospital's update, so the model is untrained; "
        f"refusals: {shown or 'none reported (no replies)'}"
    )


def build_model(name: str, encoder: TabularEncoder, settings: RunSettings) -> Any:
    model_class = get_model_class(name)
    return model_class(
        encoder, model_class.Config(**settings.model.params_for(name)), seed=settings.federation.seed
    )


def plan_stages(
    settings: RunSettings, encoder: TabularEncoder, handshake: HandshakeResult
) -> tuple[Any, Any | None, list[Stage]]:
    """The static generator first, then TimeGAN's phases; each model's share of the budget."""
    fed, seq_name = settings.federation, settings.model.sequence
    table = build_model(settings.model.generator, encoder, settings)
    table_share = 1.0 - settings.privacy.sequence_epsilon_share if seq_name else 1.0
    controller = SADQC(
        SADQCConfig(**settings.sadqc.model_dump(exclude={"contamination"})), stage=table.registry_name
    )
    quality = table_quality(table, handshake, settings)
    # How the numeric columns go together, from their DP second moments (post-processing), for
    # the static generator's pair loss.
    assert handshake.numeric is not None
    pair_targets = numeric_correlations(handshake.numeric, encoder.schema)
    stages = [
        Stage(
            table,
            "generator",
            fed.rounds,
            table.registry_name,
            budget_share=table_share,
            quality=quality,
            controller=controller,
            extra_config={"pair-correlations": json.dumps(pair_targets)},
        )
    ]
    if not seq_name:
        return table, None, stages
    sequence = build_model(seq_name, encoder, settings)
    assert handshake.moments is not None

    @functools.cache
    def profiles() -> np.ndarray:  # drawn from the trained static generator (post-processing)
        return encoder.transform(table.sample(settings.export.round_sample_rows, seed=fed.seed))

    def stand_ins() -> dict[str, Any]:
        # The joint phase's generator trains on these instead of public marginals: realistic
        # profiles, yet no record in them (samples of the DP-trained static generator).
        return {"stand-ins": encode_stand_ins(profiles())}

    moments = {"moments": handshake.moments.to_json()}
    done = 0
    for phase, rounds in fed.sequence_rounds.plan():
        stages.append(
            Stage(
                sequence,
                "sequence",
                rounds,
                f"{seq_name} {phase}",
                sequence_scorer(sequence, profiles, handshake.moments),
                phase=phase,
                rounds_before=done,
                model_rounds=fed.sequence_rounds.total,
                budget_share=1.0,
                extra_config=moments,
                late_config=stand_ins if phase == "joint" else None,
            )
        )
        done += rounds
    return table, sequence, stages


class Checkpointer:
    """Writes `out/checkpoint/` after every completed round and puts a resumed run back in place.

    A checkpoint holds the global weights of every model (and the controller's best round),
    the strategy and SA-DQC state, the round logs and scores so far, the handshake's DP
    statistics (so a resume spends no epsilon on them again) and each hospital's latest epsilon.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        federation_id: str,
        settings: RunSettings,
        encoder: TabularEncoder,
        handshake: HandshakeResult,
        stages: list[Stage],
    ):
        self.out_dir, self.federation_id, self.settings = Path(out_dir), federation_id, settings
        self.encoder, self.handshake, self.stages = encoder, handshake, stages
        self.rounds: list[RoundLog] = []  # of completed stages
        self.scores: dict[str, dict[int, float]] = {}

    def _models(self) -> dict[str, Any]:
        return {stage.model.registry_name: stage.model for stage in self.stages}

    def stage_finished(self, stage: Stage, outcome: StageOutcome) -> None:
        self.rounds.extend(outcome.rounds)
        self.scores[stage.label] = outcome.scores

    def after_round(
        self,
        stage: Stage,
        server_round: int,
        next_arrays: ArrayRecord,
        best: ArrayRecord | None,
        logs: list[RoundLog],
        scores: dict[int, float],
    ) -> None:
        name = stage.model.registry_name
        weights = {n: ArrayRecord(m.state_dict()) for n, m in self._models().items() if n != name}
        weights[name] = next_arrays
        if best is not None:
            weights[f"{name}.best"] = best
        all_logs = [*self.rounds, *logs]
        index = self.stages.index(stage)
        hospitals = {h.hospital: asdict(h) for h in self.handshake.hospitals.values()}
        progress = RunProgress(
            federation_id=self.federation_id,
            settings=flat_settings(self.settings),
            encoder_json=self.encoder.to_json(),
            stage_index=index,
            stage_label=stage.label,
            rounds_done=server_round,
            total_rounds_done=sum(s.rounds for s in self.stages[:index]) + server_round,
            hospitals=hospitals,
            refusals=self.handshake.refusals,
            moments_json=self.handshake.moments.to_json() if self.handshake.moments else None,
            controller=self.stages[0].controller.state_dict() if self.stages[0].controller else None,
            round_logs=round_log_dicts(all_logs),
            stage_scores={
                **{k: {str(r): v for r, v in s.items()} for k, s in self.scores.items()},
                stage.label: {str(r): v for r, v in scores.items()},
            },
            ledger_summaries=ledger_summaries(
                {h.hospital: h for h in self.handshake.hospitals.values()}, all_logs
            ),
            written_at=now_iso(),
        )
        if stage.controller is not None:  # also on its own, for an operator to read
            atomic_write_text(
                self.out_dir / "state" / f"sadqc-{name}.json", json.dumps(stage.controller.state_dict())
            )
        save_checkpoint(
            self.out_dir,
            progress,
            weights=weights,
            statistics={
                "reference": self.handshake.reference,
                "pairs": self.handshake.reference_pairs,
                "numeric": {NUMERIC_KEY: self.handshake.numeric},
            },
        )
        logger.info("checkpoint: %s round %d of %d written", stage.label, server_round, stage.rounds)

    def restore(self, checkpoint: Checkpoint) -> tuple[int, StageStart]:
        """Load the checkpoint's weights and state; returns the stage to go on with and its start."""
        saved = checkpoint.progress
        index, stage = saved.stage_index, self.stages[saved.stage_index]
        if stage.label != saved.stage_label or stage.rounds < saved.rounds_done:
            raise CheckpointError(
                f"checkpoint is at {saved.stage_label} round {saved.rounds_done}, which this plan "
                f"({stage.label}, {stage.rounds} rounds) does not have"
            )
        for name, model in self._models().items():
            if checkpoint.has(name):
                model.load_state_dict(checkpoint.weights(name).to_torch_state_dict())
        if saved.controller is not None and self.stages[0].controller is not None:
            self.stages[0].controller.state = (
                type(self.stages[0].controller).from_state(saved.controller).state
            )
        logs, scores = saved.logs(), saved.scores()
        labels = [s.label for s in self.stages[:index]]
        self.rounds = [log for log in logs if log.stage in labels]
        self.scores = {label: scores.get(label, {}) for label in labels}
        name = stage.model.registry_name
        best = checkpoint.weights(f"{name}.best") if checkpoint.has(f"{name}.best") else None
        if saved.rounds_done == stage.rounds:  # the stage was complete: its model ends on its best
            if best is not None:
                stage.model.load_state_dict(best.to_torch_state_dict())
            self.stage_finished(
                stage,
                StageOutcome([log for log in logs if log.stage == stage.label], scores.get(stage.label, {})),
            )
            return index + 1, StageStart()
        return index, StageStart(
            first_round=saved.rounds_done + 1,
            arrays=checkpoint.weights(name),
            best=best,
            scores=scores.get(stage.label, {}),
            logs=[log for log in logs if log.stage == stage.label],
        )


def identify_nodes(grid: Grid, node_ids: list[int], timeout_s: float) -> dict[int, str]:
    """node id -> hospital name, asked with `query.identify` (no data read, no epsilon spent)."""
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type="query.identify")
        for n in node_ids
    ]
    replies = grid.send_and_receive(messages, timeout=timeout_s)
    return {r.metadata.src_node_id: hospital_of(r) for r in replies if not r.has_error()}


def resumed_handshake(
    grid: Grid, node_ids: list[int], checkpoint: Checkpoint, settings: RunSettings
) -> HandshakeResult:
    """The checkpointed handshake, re-keyed to the node ids the hospitals have now."""
    saved = checkpoint.progress
    summaries = saved.hospital_summaries()
    names = identify_nodes(grid, node_ids, settings.federation.round_timeout_s)
    nodes = {node: summaries[name] for node, name in sorted(names.items()) if name in summaries}
    if len(nodes) < settings.federation.min_replies:
        raise CheckpointError(
            f"resume: {len(nodes)} of the checkpointed hospitals {sorted(summaries)} answered "
            f"(online: {sorted(names.values())}); quorum is {settings.federation.min_replies}"
        )
    missing = sorted(set(summaries) - {s.hospital for s in nodes.values()})
    if missing:
        logger.warning("resume: hospitals %s are not online; the run goes on without them", missing)
    return HandshakeResult(
        node_ids=sorted(nodes),
        hospitals=nodes,
        reference=checkpoint.statistics("reference"),
        refusals=saved.refusals,
        moments=SequenceMoments.from_json(saved.moments_json) if saved.moments_json else None,
        reference_pairs=checkpoint.statistics("pairs"),
        numeric=checkpoint.statistics("numeric")[NUMERIC_KEY],
    )


def run_federation(
    grid: Grid, settings: RunSettings, out_dir: Path, *, resume: bool = False
) -> dict[str, Any]:
    """All phases; returns the metrics written to `out_dir/metrics.json`.

    With `resume`, the run goes on from `out_dir/checkpoint` at the round after the last
    completed one, with the same federation id, encoder and DP statistics; a checkpoint made
    with other settings (operational knobs aside) is refused, listing what differs.
    """
    fed = settings.federation
    schema = settings.load_schema()
    node_ids = wait_for_nodes(
        grid, wanted=fed.hospitals, minimum=fed.min_replies, timeout_s=fed.round_timeout_s
    )
    checkpoint: Checkpoint | None = None
    if resume:
        checkpoint = resumable_checkpoint(out_dir, settings)
        federation_id = checkpoint.progress.federation_id
        handshake = resumed_handshake(grid, node_ids, checkpoint, settings)
        encoder = TabularEncoder.from_json(checkpoint.progress.encoder_json, schema)
        logger.info(
            "resuming federation %s after %s round %d",
            federation_id,
            checkpoint.progress.stage_label,
            checkpoint.progress.rounds_done,
        )
    else:
        federation_id = secrets.token_hex(8)
        handshake = run_handshake(
            grid,
            node_ids,
            schema,
            fed.round_timeout_s,
            with_moments=bool(settings.model.sequence),
            federation_id=federation_id,
        )
        encoder = TabularEncoder.from_histograms(schema, handshake.reference)
    logger.info(
        "encoder %s built from DP statistics of %d hospital(s)", encoder.hash[:12], len(handshake.node_ids)
    )

    table, sequence, stages = plan_stages(settings, encoder, handshake)
    checkpointer = Checkpointer(
        out_dir,
        federation_id=federation_id,
        settings=settings,
        encoder=encoder,
        handshake=handshake,
        stages=stages,
    )
    first_stage, start = checkpointer.restore(checkpoint) if checkpoint else (0, StageStart())
    remaining = sum(s.rounds for s in stages[first_stage:]) - (start.first_round - 1)
    with Progress(transient=False) as progress:
        task = progress.add_task("federated training", total=remaining)
        for stage in stages[first_stage:]:
            outcome = run_stage(
                grid,
                stage,
                encoder=encoder,
                settings=settings,
                participants=set(handshake.node_ids),
                progress=progress,
                task=task,
                federation_id=federation_id,
                start=start,
                after_round=checkpointer.after_round,
                hospital_names={node: h.hospital for node, h in handshake.hospitals.items()},
            )
            checkpointer.stage_finished(stage, outcome)
            start = StageStart()
    synthetic, timeseries = sample_linked(table, sequence, settings.export.synthetic_rows, seed=fed.seed)
    synthetic, timeseries, audit = release_and_audit(
        grid,
        settings,
        handshake,
        encoder,
        stages[0].controller,
        synthetic,
        timeseries,
        out_dir,
        federation_id=federation_id,
    )
    return export_run(
        out_dir,
        model=table,
        sequence_model=sequence,
        settings=settings,
        synthetic=synthetic,
        timeseries=timeseries,
        handshake_hospitals=handshake.hospitals,
        refusals=handshake.refusals,
        rounds=checkpointer.rounds,
        stage_scores=checkpointer.scores,
        reference=handshake.reference,
        extra_metrics={**audit, "federation_id": federation_id, "resumed": resume},
    )


def release_and_audit(
    grid: Grid,
    settings: RunSettings,
    handshake: HandshakeResult,
    encoder: TabularEncoder,
    controller: SADQC | None,
    synthetic: pd.DataFrame,
    timeseries: pd.DataFrame | None,
    out_dir: Path,
    *,
    federation_id: str = "",
) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, Any]]:
    """SA-DQC filters the final set, hospitals audit it, the report is written; returns what is released."""
    schema, fed = encoder.schema, settings.federation
    kept, removed = filter_anomalies(
        synthetic,
        encoder.transform(synthetic),
        schema=schema,
        contamination=settings.sadqc.contamination,
        seed=fed.seed,
    )
    synthetic = synthetic.loc[kept.index].reset_index(drop=True)
    if timeseries is not None:  # a removed profile takes its week with it
        timeseries = timeseries[timeseries[schema.id_column].isin(set(synthetic[schema.id_column]))]
        timeseries = timeseries.reset_index(drop=True)
    final_scores = score_sample(synthetic, handshake.reference, handshake.reference_pairs, schema)
    if controller is not None:
        controller.record_filter(
            fed.rounds, n_before=len(kept) + sum(removed.values()), removed=removed, scores=final_scores
        )
    audited = synthetic.head(settings.audit.synthetic_rows)
    sample = encoder.transform(audited)
    weeks = None
    if timeseries is not None:
        weeks = SequenceEncoder.from_schema(schema).transform(
            timeseries[timeseries[schema.id_column].isin(set(audited[schema.id_column]))],
            audited[schema.id_column],
        )
    answers = request_audit(
        grid,
        sorted(handshake.node_ids),
        sample,
        encoder,
        fed.round_timeout_s,
        weeks,
        federation_id=federation_id,
    )
    dcr, attacks, ledgers, refusals = answers.dcr, answers.attacks, answers.ledgers, answers.refusals
    check_aggregate_only(dcr + attacks)
    inputs = {
        "quality": {**final_scores.model_dump(), "removed": removed},
        "reference_histograms": handshake.reference,
        "reference_pairs": handshake.reference_pairs,
        "dcr": dcr,
        "attacks": attacks,
        "ledger": ledgers,
        "decisions": controller.decisions() if controller is not None else [],
        "audit_refusals": refusals,
    }
    save_audit_inputs(out_dir, inputs)
    report = render_report(out_dir, inputs, synthetic, schema, gates_from(settings.audit))
    logger.info("privacy audit: %s (report %s)", "PASS" if report.passed else "FAIL", report.html_path)
    audit = {
        "ledger": ledgers,
        "audit": {
            "passed": report.passed,
            "gates": [g.model_dump() for g in report.gates],
            "refusals": refusals,
        },
        "sadqc": {"final": final_scores.model_dump(), "removed": removed, "decisions": inputs["decisions"]},
        "sequence_evaluation": {
            "merged": merge_sequence_metrics(answers.sequence),
            "per_hospital": answers.sequence,
        },
    }
    return synthetic, timeseries, audit
