"""`mindfed evaluate` / `compare`: synthetic tables scored against real data that a steward holds."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from client.data import MAX_REPORTED_ISSUES, Cohort, CohortValidationError, clip, load_cohort
from configs.schema import CohortSchema, ColumnSpec
from models.encoder import TabularEncoder
from models.pairs import column_pairs, contingency_similarity, correlation_similarity, cramers_v, pair_key
from models.risk.scores import risk_scores
from models.statistics import column_counts, column_shape_vs_real, histogram_counts, mean_score
from privacy.attacks import AttackResult, DCRResult, dcr_overfitting_protection, run_membership_attacks
from simulation.evaluation import _fitted, _scores

EVALUATION_VERSION = 1
# SDMetrics' QualityReport counts a pair only where the real table shows a trend: |Pearson r| above
# 0.5 (two numeric columns) or Cramér's V above 0.3 (otherwise), its defaults in sdmetrics.reports.utils.
CORRELATION_THRESHOLD = 0.5
ASSOCIATION_THRESHOLD = 0.3
# SDMetrics discretises a numeric column for ContingencySimilarity with np.histogram_bin_edges (10
# equal-width bins over that table's own range) and np.digitize: codes 0 .. 11, the maximum alone in 11.
_NUMERIC_CELLS = 12
# Attacks: below this many holdout patients there are not 2 candidates and 2 reference records.
_MIN_HOLDOUT = 4


class EvaluationInputError(ValueError):
    """An input table is missing or invalid, or the options do not fit together."""


@dataclass(frozen=True)
class Table:
    """One validated table of static profiles: its name in the report, where it came from, its rows."""

    name: str
    source: Path
    static: pd.DataFrame
    has_ids: bool  # False: a CSV without the id column, given row-number ids here


# ---------------------------------------------------------------------------- loading
def load_table(path: str | Path, schema: CohortSchema, *, option: str, name: str | None = None) -> Table:
    """A cohort folder (static.csv [+ timeseries.csv]) or a static-profile CSV, validated as `check` does."""
    path = Path(path)
    try:
        if path.is_dir():
            with_weeks = schema.sequence is not None and (path / "timeseries.csv").is_file()
            cohort, has_ids = load_cohort(path, schema if with_weeks else _static_only(schema)), True
        elif path.is_file():
            cohort, has_ids = _load_csv(path, schema)
        else:
            raise EvaluationInputError(f"{option} {path}: no such file or folder")
    except CohortValidationError as err:
        raise EvaluationInputError(_problems(option, path, err)) from None
    return Table(name or path.stem, path, cohort.static, has_ids)


def load_inputs(
    real: Path,
    synthetic: Sequence[Path],
    schema: CohortSchema,
    *,
    names: Sequence[str] = (),
    holdout: Path | None = None,
) -> tuple[Table, list[Table], Table | None]:
    """The real table, each synthetic table under its name and the optional holdout, all validated."""
    chosen = table_names(synthetic, names)
    real_table = load_table(real, schema, option="--real")
    tables = [
        load_table(p, schema, option="--synthetic", name=n) for p, n in zip(synthetic, chosen, strict=True)
    ]
    held = load_table(holdout, schema, option="--holdout") if holdout is not None else None
    if held is not None:
        _check_holdout(real_table, held, schema.id_column)
    return real_table, tables, held


def table_names(paths: Sequence[Path], names: Sequence[str]) -> list[str]:
    """`names` (one per synthetic table), or the files' stems; counts and repeats are checked."""
    if not paths:
        raise EvaluationInputError("give at least one --synthetic table")
    if names and len(names) != len(paths):
        raise EvaluationInputError(
            f"--names gives {_count(len(names), 'name')} for {_count(len(paths), '--synthetic table')}"
        )
    chosen = [n.strip() for n in names] if names else [Path(p).stem for p in paths]
    if not all(chosen):
        raise EvaluationInputError("--names: a table name is empty")
    repeated = sorted({n for n in chosen if chosen.count(n) > 1})
    if repeated:
        raise EvaluationInputError(f"table names repeat: {repeated}; give each table its own --names entry")
    return chosen


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _static_only(schema: CohortSchema) -> CohortSchema:
    return schema.model_copy(update={"sequence": None})


def _load_csv(path: Path, schema: CohortSchema) -> tuple[Cohort, bool]:
    """Validate a CSV as a folder's static.csv would be; problems name the CSV, not static.csv."""
    with tempfile.TemporaryDirectory(prefix="mindfed-evaluate-") as folder:
        has_ids = _stage_csv(path, Path(folder) / "static.csv", schema.id_column)
        try:
            return load_cohort(folder, _static_only(schema)), has_ids
        except CohortValidationError as err:
            issues = [replace(i, file=path.name) if i.file == "static.csv" else i for i in err.issues]
            raise CohortValidationError(path, issues) from None


def _stage_csv(path: Path, staged: Path, id_column: str) -> bool:
    """Link `path` to `staged`, or write it there with row-number ids if it has no id column."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
        rows = list(csv.reader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error):
        rows = []  # load_cohort reads the file itself and names the problem
    if not rows or id_column in rows[0]:
        os.symlink(path.resolve(), staged)
        return True
    with staged.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([id_column, *rows[0]])
        for line, row in enumerate(rows[1:], start=2):
            writer.writerow([f"row-{line}" if any(c.strip() for c in row) else "", *row])
    return False


def _problems(option: str, path: Path, err: CohortValidationError) -> str:
    shown = "\n".join(f"  - {issue}" for issue in err.issues[:MAX_REPORTED_ISSUES])
    more = len(err.issues) - MAX_REPORTED_ISSUES
    return f"{option} {path} is invalid ({_count(len(err.issues), 'problem')}):\n{shown}" + (
        f"\n  ... and {more} more" if more > 0 else ""
    )


def _check_holdout(real: Table, holdout: Table, id_column: str) -> None:
    if len(real.static) < 2:
        raise EvaluationInputError(f"--real {real.source} has 1 patient; with --holdout it needs at least 2")
    if len(holdout.static) < _MIN_HOLDOUT:
        raise EvaluationInputError(
            f"--holdout {holdout.source} has {len(holdout.static)} patients; the attacks need at least "
            f"{_MIN_HOLDOUT} (half are non-member candidates, half the attacker's reference sample)"
        )
    if real.has_ids and holdout.has_ids:
        shared = sorted(set(real.static[id_column]) & set(holdout.static[id_column]))
        if shared:
            raise EvaluationInputError(
                f"--holdout {holdout.source} shares {len(shared)} patient ids with --real (e.g. "
                f"'{clip(shared[0])}'): the holdout must be patients the generator never saw"
            )


# ---------------------------------------------------------------------------- quality
class PairTrend(BaseModel):
    """One column pair as SDMetrics' QualityReport scores it, and the real and synthetic trends."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["CorrelationSimilarity", "ContingencySimilarity"]
    score: float
    real: float  # Pearson's r (two numeric columns) or Cramér's V of the real table
    synthetic: float
    counted: bool  # the real trend passes SDMetrics' threshold, so the pair enters column_pair_trends


class Quality(BaseModel):
    """SDMetrics-compatible quality: column shapes, column pair trends, their mean, and the details."""

    model_config = ConfigDict(extra="forbid")

    column_shapes: float
    column_pair_trends: float  # NaN (null in JSON) when no real pair shows a trend
    overall: float
    per_column: dict[str, float]
    per_pair: dict[str, PairTrend]


def quality_scores(real: pd.DataFrame, synthetic: pd.DataFrame, schema: CohortSchema) -> Quality:
    """MindFed's own SDMetrics QualityReport: KS/TV complements per column, pair trends per pair."""
    per_column = column_shape_vs_real(synthetic, real, schema)
    per_pair = {pair_key(a.name, b.name): pair_trend(real, synthetic, a, b) for a, b in column_pairs(schema)}
    counted = [p.score for p in per_pair.values() if p.counted]
    shapes = mean_score(per_column)
    pairs = float(np.mean(counted)) if counted else float("nan")
    overall = shapes if np.isnan(pairs) else (shapes + pairs) / 2.0
    return Quality(
        column_shapes=shapes,
        column_pair_trends=pairs,
        overall=overall,
        per_column=per_column,
        per_pair=per_pair,
    )


def pair_trend(real: pd.DataFrame, synthetic: pd.DataFrame, a: ColumnSpec, b: ColumnSpec) -> PairTrend:
    """CorrelationSimilarity (Pearson) for two numeric columns, else ContingencySimilarity."""
    if not (a.is_categorical or b.is_categorical):
        r_real, r_syn = _pearson(real, a.name, b.name), _pearson(synthetic, a.name, b.name)
        score = correlation_similarity(r_syn, r_real)
        counted = bool(abs(r_real) > CORRELATION_THRESHOLD and np.isfinite(score))
        return PairTrend(
            metric="CorrelationSimilarity", score=score, real=r_real, synthetic=r_syn, counted=counted
        )
    real_table, syn_table = _contingency(real, a, b), _contingency(synthetic, a, b)
    v_real = cramers_v(real_table)
    return PairTrend(
        metric="ContingencySimilarity",
        score=contingency_similarity(real_table, syn_table),
        real=v_real,
        synthetic=cramers_v(syn_table),
        counted=v_real > ASSOCIATION_THRESHOLD,
    )


def _pearson(frame: pd.DataFrame, a: str, b: str) -> float:
    x, y = (frame[c].to_numpy(dtype=np.float64) for c in (a, b))
    dx, dy = x - x.mean(), y - y.mean()
    spread = float(np.sqrt((dx @ dx) * (dy @ dy)))
    return float(np.clip(dx @ dy / spread, -1.0, 1.0)) if spread > 0 else float("nan")


def _codes(values: pd.Series, spec: ColumnSpec) -> tuple[np.ndarray, int]:
    """Each row's cell: its category, or SDMetrics' bin of a numeric value within this table's range."""
    if spec.is_categorical:
        categories = list(spec.categories or ())
        codes = pd.Categorical(values, categories=categories).codes
        return np.asarray(codes, dtype=np.int64), len(categories)
    x = values.to_numpy(dtype=np.float64)
    return np.digitize(x, np.histogram_bin_edges(x)).astype(np.int64), _NUMERIC_CELLS


def _contingency(frame: pd.DataFrame, a: ColumnSpec, b: ColumnSpec) -> np.ndarray:
    (ca, na), (cb, nb) = _codes(frame[a.name], a), _codes(frame[b.name], b)
    valid = (ca >= 0) & (cb >= 0)
    return np.bincount(ca[valid] * nb + cb[valid], minlength=na * nb).reshape(na, nb).astype(np.float64)


def marginal_shares(frame: pd.DataFrame, schema: CohortSchema) -> dict[str, list[float]]:
    """Each column's share of rows per public cell (categories, or the schema's numeric bins)."""
    shares = {}
    for spec in schema.columns:
        counts = column_counts(frame[spec.name], spec)
        shares[spec.name] = (counts / max(counts.sum(), 1.0)).tolist()
    return shares


# ---------------------------------------------------------------------------- utility and privacy
def tstr_scores(train: pd.DataFrame, real: pd.DataFrame, schema: CohortSchema, seed: int) -> dict[str, float]:
    """The label's gradient-boosting classifier trained on `train`, scored on the real table."""
    label = schema.label_column
    classes = list(schema.column(label).categories or ())
    if train[label].nunique() < 2:  # a collapsed generator: the only model it allows predicts its one class
        probabilities = np.zeros((len(real), len(classes)))
        probabilities[:, classes.index(train[label].iloc[0])] = 1.0
        truth = pd.Categorical(real[label], categories=classes).codes.astype(np.int64)
        return risk_scores(probabilities, truth, len(classes))
    return _scores(_fitted(train, schema, seed), real, schema)


@dataclass(frozen=True)
class _AttackSetting:
    """The encoded real rows the attacks need: members, non-member candidates, the reference sample."""

    encoder: TabularEncoder
    members: np.ndarray
    holdout: np.ndarray
    nonmembers: np.ndarray
    reference: np.ndarray


def _attack_setting(
    real: pd.DataFrame, holdout: pd.DataFrame, schema: CohortSchema, seed: int
) -> _AttackSetting:
    """Encode with the population's histograms; half the holdout are candidates, half the reference."""
    population = pd.concat([real, holdout], ignore_index=True)
    encoder = TabularEncoder.from_histograms(schema, histogram_counts(population, schema))
    held = encoder.transform(holdout).astype(np.float64)
    order = np.random.default_rng([3, seed]).permutation(len(held))
    half = len(held) // 2
    return _AttackSetting(
        encoder, encoder.transform(real).astype(np.float64), held, held[order[:half]], held[order[half:]]
    )


# ---------------------------------------------------------------------------- the evaluation
class TableInfo(BaseModel):
    """Where a real table came from and how many patients it has."""

    source: str
    rows: int


class TableScores(BaseModel):
    """Everything measured for one synthetic table."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    rows: int
    quality: Quality
    tstr: dict[str, float]
    marginals: dict[str, list[float]]
    dcr: DCRResult | None = None
    attacks: list[AttackResult] = []

    @property
    def worst_attack_auc(self) -> float | None:
        """The highest AUC of the membership attacks (None without a holdout)."""
        return max((a.auc for a in self.attacks), default=None)


class Evaluation(BaseModel):
    """The whole report.json: the real side, thresholds, and one `TableScores` per synthetic table."""

    version: int = EVALUATION_VERSION
    generated: str
    label: str
    real: TableInfo
    holdout: TableInfo | None
    thresholds: dict[str, float]
    tstr_baseline: dict[str, float] | None  # trained on the holdout (real non-members), tested on real
    real_marginals: dict[str, list[float]]
    tables: list[TableScores]


def evaluate_tables(
    real: Table,
    synthetic: Sequence[Table],
    schema: CohortSchema,
    *,
    holdout: Table | None = None,
    seed: int = 0,
    n_bootstrap: int = 200,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Score every synthetic table against the real one (and attack it, given a holdout)."""
    setting = _attack_setting(real.static, holdout.static, schema, seed) if holdout is not None else None
    tables = []
    for table in synthetic:
        tables.append(_score_table(table, real.static, schema, setting, seed=seed, n_bootstrap=n_bootstrap))
        if progress is not None:
            progress(table.name)
    return Evaluation(
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        label=schema.label_column,
        real=TableInfo(source=str(real.source), rows=len(real.static)),
        holdout=TableInfo(source=str(holdout.source), rows=len(holdout.static)) if holdout else None,
        thresholds={"correlation": CORRELATION_THRESHOLD, "association": ASSOCIATION_THRESHOLD},
        tstr_baseline=tstr_scores(holdout.static, real.static, schema, seed) if holdout else None,
        real_marginals=marginal_shares(real.static, schema),
        tables=tables,
    )


def _score_table(
    table: Table,
    real: pd.DataFrame,
    schema: CohortSchema,
    setting: _AttackSetting | None,
    *,
    seed: int,
    n_bootstrap: int,
) -> TableScores:
    dcr, attacks = None, []
    if setting is not None:
        encoded = setting.encoder.transform(table.static).astype(np.float64)
        dcr = dcr_overfitting_protection(setting.members, setting.holdout, encoded, seed=seed)
        attacks = run_membership_attacks(
            setting.members,
            setting.nonmembers,
            encoded,
            setting.reference,
            seed=seed,
            n_bootstrap=n_bootstrap,
        )
    return TableScores(
        name=table.name,
        source=str(table.source),
        rows=len(table.static),
        quality=quality_scores(real, table.static, schema),
        tstr=tstr_scores(table.static, real, schema, seed),
        marginals=marginal_shares(table.static, schema),
        dcr=dcr,
        attacks=attacks,
    )
