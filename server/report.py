"""Audit report: `report.json` and a self-contained `report.html` (plots embedded as PNG data URIs).

Sections: pass/fail gates, quality (synthetic vs DP reference marginals, association-difference
heatmap, SA-DQC scores), privacy (DCR histograms and ROC curves of each membership attack, with
per-hospital tables), the per-hospital epsilon ledger, and the SA-DQC decision timeline.

Everything shown is already aggregate: DP statistics, synthetic rows, and the metrics and counts
hospitals sent back. Text from inputs is HTML-escaped; the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from configs.schema import CohortSchema, ColumnSpec
from models.pairs import pair_key
from models.statistics import Histograms, column_counts
from privacy.storage import atomic_write_text

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_VERSION = 1
_DPI = 90


# ---------------------------------------------------------------------------- gates
class GateThresholds(BaseModel):
    """Pass/fail thresholds of the audit; each gate is checked on the worst hospital and attack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attack_auc: float = Field(default=0.55, ge=0.0, le=1.0)
    max_attack_auc_ci_high: float = Field(default=0.60, ge=0.0, le=1.0)
    max_tpr_at_1pct_fpr: float = Field(default=0.03, ge=0.0, le=1.0)
    min_dcr_protection: float = Field(default=0.90, ge=0.0, le=1.0)


class GateResult(BaseModel):
    """One gate: the worst value over hospitals (and attacks), where it occurred, PASS/FAIL."""

    model_config = ConfigDict(extra="forbid")

    name: str
    metric: str
    comparator: Literal["<=", ">="]
    threshold: float
    value: float | None
    worst: str
    passed: bool


@dataclass(frozen=True)
class ReportResult:
    json_path: Path
    html_path: Path
    passed: bool
    gates: list[GateResult]


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _gate(
    name: str,
    metric: str,
    comparator: Literal["<=", ">="],
    threshold: float,
    rows: list[tuple[str, Any]],
) -> GateResult:
    """Worst value among `(where, value)` rows; missing or non-finite evidence fails the gate."""
    values = [(where, _finite(v)) for where, v in rows]
    if not values:
        return GateResult(
            name=name, metric=metric, comparator=comparator, threshold=threshold, value=None,
            worst="no results", passed=False,
        )  # fmt: skip
    broken = [where for where, v in values if v is None]
    if broken:
        return GateResult(
            name=name, metric=metric, comparator=comparator, threshold=threshold, value=None,
            worst=f"not finite: {broken[0]}", passed=False,
        )  # fmt: skip
    pick = max if comparator == "<=" else min
    where, value = pick(values, key=lambda row: row[1])  # type: ignore[arg-type, return-value]
    assert value is not None
    passed = value <= threshold if comparator == "<=" else value >= threshold
    return GateResult(
        name=name, metric=metric, comparator=comparator, threshold=threshold, value=value,
        worst=where, passed=passed,
    )  # fmt: skip


def evaluate_gates(
    dcr: Sequence[Mapping[str, Any]], attacks: Sequence[Mapping[str, Any]], gates: GateThresholds
) -> list[GateResult]:
    """The four gates, each on the worst hospital / attack (largest AUC, CI upper bound and TPR,
    smallest DCR protection). No results for a gate, or a non-finite one, fails it."""
    where = [f"{a.get('hospital', '?')} / {a.get('name', '?')}" for a in attacks]
    return [
        _gate(
            "membership attack AUC",
            "auc",
            "<=",
            gates.max_attack_auc,
            [(w, a.get("auc")) for w, a in zip(where, attacks, strict=True)],
        ),
        _gate(
            "attack AUC 95% CI upper bound",
            "auc_ci_high",
            "<=",
            gates.max_attack_auc_ci_high,
            [(w, a.get("auc_ci_high")) for w, a in zip(where, attacks, strict=True)],
        ),
        _gate(
            "attack TPR at 1% FPR",
            "tpr_at_1pct_fpr",
            "<=",
            gates.max_tpr_at_1pct_fpr,
            [(w, a.get("tpr_at_1pct_fpr")) for w, a in zip(where, attacks, strict=True)],
        ),
        _gate(
            "DCR overfitting protection",
            "score",
            ">=",
            gates.min_dcr_protection,
            [(str(d.get("hospital", "?")), d.get("score")) for d in dcr],
        ),
    ]


# ---------------------------------------------------------------------------- JSON
def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, BaseModel):
        return item.model_dump(mode="json")
    if is_dataclass(item) and not isinstance(item, type):
        return asdict(item)
    return dict(item)


def _jsonable(value: Any) -> Any:
    """Plain JSON values; NaN and infinities become null (the JSON is written strict)."""
    if isinstance(value, BaseModel):
        return _jsonable(value.model_dump(mode="json"))
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _probabilities(counts: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    total = c.sum()
    return c / total if total > 0 else np.zeros_like(c)


def _cell_labels(spec: ColumnSpec) -> list[str]:
    if spec.is_categorical:
        return list(spec.categories or ())
    edges = spec.bin_edges()
    return [f"[{lo:g}, {hi:g})" for lo, hi in itertools.pairwise(edges)]


def _marginals(
    schema: CohortSchema, reference: Histograms, synthetic: pd.DataFrame
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for spec in schema.columns:
        ref = np.asarray(reference.get(spec.name, np.zeros(spec.n_cells())), dtype=np.float64)
        out[spec.name] = {
            "kind": spec.kind,
            "cells": _cell_labels(spec),
            "reference": _probabilities(ref).tolist(),
            "synthetic": _probabilities(column_counts(synthetic[spec.name], spec)).tolist(),
        }
    return out


# ---------------------------------------------------------------------------- figures
def _figure_tools() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("the audit report needs matplotlib (pip install matplotlib)") from err
    return Figure, FigureCanvasAgg


def _png(draw: Callable[[Any], None], size: tuple[float, float]) -> str:
    """Draw on a fresh Agg figure (no pyplot state) and return it as a base64 PNG."""
    figure_cls, canvas_cls = _figure_tools()
    fig = figure_cls(figsize=size, dpi=_DPI, layout="constrained")
    canvas_cls(fig)
    draw(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _marginal_png(spec: ColumnSpec, entry: dict[str, Any], score: float | None) -> str:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        ref, syn = np.asarray(entry["reference"]), np.asarray(entry["synthetic"])
        if spec.is_categorical:
            x = np.arange(len(ref))
            ax.bar(x - 0.2, ref, width=0.4, label="DP reference", color="#4c72b0")
            ax.bar(x + 0.2, syn, width=0.4, label="synthetic", color="#dd8452")
            ax.set_xticks(x, entry["cells"], rotation=30, ha="right", fontsize=7)
        else:
            edges = spec.bin_edges()
            ax.stairs(ref, edges, label="DP reference", color="#4c72b0", fill=True, alpha=0.35)
            ax.stairs(syn, edges, label="synthetic", color="#dd8452", linewidth=1.8)
            ax.set_xlabel(spec.unit or spec.name, fontsize=8)
        title = spec.name if score is None else f"{spec.name} (shape {score:.3f})"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("share of rows", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)

    return _png(draw, (3.6, 2.7))


def _heatmap_png(schema: CohortSchema, pair_differences: Mapping[str, float]) -> str:
    names = schema.column_names
    matrix = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names[i + 1 :], start=i + 1):
            value = _finite(pair_differences.get(pair_key(a, b), pair_differences.get(pair_key(b, a))))
            if value is not None:
                matrix[i, j] = matrix[j, i] = value
    finite = matrix[np.isfinite(matrix)]
    limit = max(0.1, float(np.abs(finite).max())) if finite.size else 1.0

    def draw(fig: Any) -> None:
        import matplotlib as mpl

        ax = fig.add_subplot()
        cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-limit, vmax=limit)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:+.2f}", ha="center", va="center", fontsize=6.5)
        fig.colorbar(image, ax=ax, label="synthetic - reference association")
        ax.set_title("association difference (Pearson r / Cramér's V)", fontsize=9)

    return _png(draw, (7.0, 5.8))


def _dcr_png(entry: Mapping[str, Any]) -> str:
    edges = np.asarray(entry.get("dcr_bin_edges", ()), dtype=np.float64)
    train = np.asarray(entry.get("dcr_training_counts", ()), dtype=np.float64)
    hold = np.asarray(entry.get("dcr_holdout_counts", ()), dtype=np.float64)

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        if edges.size >= 2 and train.size == edges.size - 1 and hold.size == edges.size - 1:
            ax.stairs(train, edges, label="to training (members)", color="#c44e52", linewidth=1.6)
            ax.stairs(hold, edges, label="to holdout (non-members)", color="#4c72b0", linewidth=1.6)
            ax.set_xscale("symlog", linthresh=max(float(edges[1]), 1e-12))
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no histogram", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("distance to closest record", fontsize=8)
        ax.set_ylabel("synthetic rows", fontsize=8)
        score = _finite(entry.get("score"))
        suffix = "" if score is None else f" (protection {score:.3f})"
        ax.set_title(f"DCR: {entry.get('hospital', '?')}{suffix}", fontsize=9)
        ax.tick_params(labelsize=7)

    return _png(draw, (4.2, 2.9))


def _roc_png(name: str, curves: list[Mapping[str, Any]]) -> str:
    def draw(fig: Any) -> None:
        linear, low = fig.subplots(1, 2)
        diagonal = np.logspace(-4, 0, 200)
        for ax in (linear, low):
            ax.plot(diagonal, diagonal, linestyle="--", color="grey", linewidth=1, label="chance")
        for entry in curves:
            fpr = np.asarray(entry.get("roc_fpr", ()), dtype=np.float64)
            tpr = np.asarray(entry.get("roc_tpr", ()), dtype=np.float64)
            if fpr.size == 0 or fpr.size != tpr.size:
                continue
            auc = _finite(entry.get("auc"))
            label = f"{entry.get('hospital', '?')}" + ("" if auc is None else f" (AUC {auc:.3f})")
            linear.plot(fpr, tpr, linewidth=1.5, label=label)
            positive = fpr > 0
            low.plot(fpr[positive], tpr[positive], linewidth=1.5)
        linear.set(xlim=(0, 1), ylim=(0, 1))
        low.set_xscale("log")
        low.set(xlim=(1e-4, 1), ylim=(0, 1))
        low.axvline(0.01, color="black", linewidth=0.8, linestyle=":")
        for ax, title in ((linear, f"ROC: {name}"), (low, "low-FPR region (log FPR)")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("false positive rate", fontsize=8)
            ax.set_ylabel("true positive rate", fontsize=8)
            ax.tick_params(labelsize=7)
        linear.legend(fontsize=7, loc="lower right")

    return _png(draw, (7.6, 3.2))


def _timeline_png(decisions: list[Mapping[str, Any]]) -> str | None:
    rounds = [d for d in decisions if d.get("action") in {"accept", "keep", "rollback"}]
    if not rounds:
        return None
    stages = {d.get("stage", "") for d in rounds}
    use_round = len(stages) == 1
    styles = {"accept": ("o", "#55a868"), "keep": ("s", "#8c8c8c"), "rollback": ("X", "#c44e52")}

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        xs = [d["round"] if use_round else i + 1 for i, d in enumerate(rounds)]
        scores = [_finite((d.get("scores") or {}).get("overall")) for d in rounds]
        ax.plot(xs, [np.nan if s is None else s for s in scores], color="#4c72b0", linewidth=1)
        floor = [
            np.nan
            if d.get("best_score") is None
            else d["best_score"] - d.get("next_threshold", d.get("threshold", 0.0))
            for d in rounds
        ]
        ax.step(xs, floor, where="post", color="#c44e52", linestyle=":", label="rollback below")
        for action, (marker, color) in styles.items():
            points = [(x, s) for x, s, d in zip(xs, scores, rounds, strict=True) if d["action"] == action]
            points = [(x, s) for x, s in points if s is not None]
            if points:
                ax.scatter(*zip(*points, strict=True), marker=marker, color=color, label=action, zorder=3)
        ax.set_xlabel("round" if use_round else "decision #", fontsize=8)
        ax.set_ylabel("overall quality", fontsize=8)
        ax.set_title("SA-DQC decisions", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)

    return _png(draw, (6.4, 3.0))


# ---------------------------------------------------------------------------- HTML helpers
def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) or "–"
    return str(value)


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    element_id: str | None = None,
    row_classes: Sequence[str] | None = None,
) -> str:
    ident = f' id="{html.escape(element_id)}"' if element_id else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{html.escape(row_classes[i])}"' if row_classes else ""
        cells = "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr.pass td:last-child, span.pass { color: #1a7f37; font-weight: bold; }
tr.fail td:last-child, span.fail { color: #b42318; font-weight: bold; }
tr.rollback { background: #fdecea; } tr.accept { background: #edf7ee; } tr.filter { background: #eef3fb; }
.grid { display: flex; flex-wrap: wrap; gap: 0.6em; }
.banner { font-size: 1.3em; padding: 0.4em 0.8em; display: inline-block; border-radius: 4px; }
.banner.pass { background: #edf7ee; } .banner.fail { background: #fdecea; }
.note { color: #555; font-size: 0.9em; }
"""


# ---------------------------------------------------------------------------- report
def _hospital_sorted(items: Sequence[Any]) -> list[dict[str, Any]]:
    rows = [_as_dict(item) for item in items]
    for i, row in enumerate(rows):
        row.setdefault("hospital", f"hospital-{i + 1}")
    return sorted(rows, key=lambda r: (str(r["hospital"]), str(r.get("name", ""))))


def _ledger_html(ledger: list[dict[str, Any]]) -> str:
    if not ledger:
        return '<p class="note">No ledger entries were reported.</p>'
    scalar_keys: list[str] = []
    for entry in ledger:
        for key, value in entry.items():
            if not isinstance(value, list | dict) and key not in scalar_keys:
                scalar_keys.append(key)
    parts = [_table(scalar_keys, [[e.get(k) for k in scalar_keys] for e in ledger])]
    for entry in ledger:
        charges = entry.get("entries")
        if isinstance(charges, list) and charges:
            keys = list(dict.fromkeys(k for c in charges for k in c))
            parts.append(f"<h3>charges: {html.escape(str(entry.get('hospital', '?')))}</h3>")
            parts.append(_table(keys, [[c.get(k) for k in keys] for c in charges]))
    return "".join(parts)


def _render_html(
    doc: dict[str, Any], schema: CohortSchema, gate_results: list[GateResult], passed: bool
) -> str:
    quality = doc["quality"]
    scores = quality.get("scores") or {}
    per_column = scores.get("per_column") or {}
    out: list[str] = []
    verdict = "PASS" if passed else "FAIL"
    cls = "pass" if passed else "fail"
    out.append(f"<h1>MindFed audit report</h1><p class='note'>generated {html.escape(doc['generated'])}</p>")
    out.append(f'<p class="banner {cls}">Overall: {verdict}</p>')

    # gates
    out.append('<section id="gates"><h2>Pass/fail gates</h2>')
    out.append(
        '<p class="note">Each gate is evaluated on the worst hospital and attack: the largest AUC, '
        "CI upper bound and TPR over every hospital and attack, the smallest DCR protection over "
        "every hospital. A gate without results fails.</p>"
    )
    out.append(
        _table(
            ["gate", "worst value", "threshold", "worst at", "result"],
            [
                [g.name, g.value, f"{g.comparator} {g.threshold:g}", g.worst, "PASS" if g.passed else "FAIL"]
                for g in gate_results
            ],
            element_id="gates-table",
            row_classes=["pass" if g.passed else "fail" for g in gate_results],
        )
    )
    out.append("</section>")

    # quality
    out.append('<section id="quality"><h2>Quality: synthetic vs DP reference</h2>')
    headline = {k: scores.get(k) for k in ("overall", "column_shape", "pair_trends", "violations_rate")}
    if any(v is not None for v in headline.values()):
        out.append(_table(list(headline), [list(headline.values())]))
    extra = {k: v for k, v in scores.items() if k not in {*headline, "per_column", "per_pair"}}
    if extra:
        out.append(_table(["item", "value"], [[k, v] for k, v in extra.items()]))
    out.append("<h3>Column marginals</h3><div class='grid'>")
    for spec in schema.columns:
        score = _finite(per_column.get(spec.name))
        out.append(_img(_marginal_png(spec, quality["marginals"][spec.name], score), f"marginal {spec.name}"))
    out.append("</div><h3>Association differences</h3>")
    out.append(
        "<p class='note'>Synthetic minus DP-reference association per column pair: Pearson's r for "
        "two numeric columns, Cramér's V otherwise (both from the pair tables on public bins).</p>"
    )
    out.append(_img(_heatmap_png(schema, quality.get("pair_differences") or {}), "association differences"))
    out.append("</section>")

    # privacy
    privacy = doc["privacy"]
    out.append('<section id="privacy"><h2>Privacy audit</h2><h3>Distance to closest record</h3>')
    dcr_keys = [
        "hospital", "score", "closer_to_training", "median_dcr_training", "median_dcr_holdout",
        "mean_nndr", "n_synthetic", "n_training", "n_holdout",
    ]  # fmt: skip
    out.append(_table(dcr_keys, [[d.get(k) for k in dcr_keys] for d in privacy["dcr"]]))
    out.append("<div class='grid'>")
    for entry in privacy["dcr"]:
        out.append(_img(_dcr_png(entry), f"DCR histogram {entry.get('hospital', '?')}"))
    out.append("</div><h3>Membership-inference attacks</h3>")
    attack_keys = [
        "hospital", "name", "auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr",
        "n_members", "n_nonmembers",
    ]  # fmt: skip
    out.append(_table(attack_keys, [[a.get(k) for k in attack_keys] for a in privacy["attacks"]]))
    by_name: dict[str, list[dict[str, Any]]] = {}
    for entry in privacy["attacks"]:
        by_name.setdefault(str(entry.get("name", "?")), []).append(entry)
    for name, curves in sorted(by_name.items()):
        out.append(_img(_roc_png(name, curves), f"ROC {name}"))
    out.append("</section>")

    # ledger
    out.append('<section id="ledger"><h2>Privacy ledger (epsilon per hospital)</h2>')
    out.append(_ledger_html(doc["ledger"]))
    out.append("</section>")

    # SA-DQC
    decisions = doc["sadqc"]["decisions"]
    out.append('<section id="sadqc"><h2>SA-DQC decisions</h2>')
    timeline = _timeline_png(decisions)
    if timeline:
        out.append(_img(timeline, "SA-DQC timeline"))
    if decisions:
        out.append(
            _table(
                ["round", "stage", "action", "overall", "threshold", "best round", "adjustments", "reason"],
                [
                    [
                        d.get("round"),
                        d.get("stage") or "–",
                        d.get("action"),
                        (d.get("scores") or {}).get("overall"),
                        d.get("threshold"),
                        d.get("best_round"),
                        d.get("adjustments") or d.get("removed") or {},
                        d.get("reason"),
                    ]
                    for d in decisions
                ],
                element_id="sadqc-timeline",
                row_classes=[str(d.get("action", "")) for d in decisions],
            )
        )
    else:
        out.append('<p class="note">No SA-DQC decisions were logged.</p>')
    out.append("</section>")

    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>MindFed audit report</title>"
        f"<style>{_CSS}</style></head><body>{''.join(out)}</body></html>\n"
    )


def write_report(
    out_dir: Path,
    *,
    quality: Mapping[str, Any],
    per_column_reference: Histograms,
    synthetic: pd.DataFrame,
    schema: CohortSchema,
    pair_differences: Mapping[str, float],
    dcr: Sequence[Any],
    attacks: Sequence[Any],
    ledger: Sequence[Any],
    decisions: Sequence[Any],
    gates: GateThresholds | None = None,
) -> ReportResult:
    """Write `report.json` and `report.html` into `out_dir` (each atomically); return the verdict.

    quality: e.g. `QualityScores.model_dump()` of the released set plus any extra scalars (filter
    counts); its `per_column` scores label the marginal plots. pair_differences: `"a|b"` ->
    synthetic minus reference association (`models.pairs.association_differences`). dcr / attacks:
    one dict per hospital (and attack) with DCRResult / AttackResult fields plus `hospital`.
    ledger: one dict per hospital (scalars, optional `entries` list of charges). decisions:
    `SADQC.decisions()`. Gates are evaluated on the worst hospital / attack (`evaluate_gates`).
    """
    gates = gates or GateThresholds()
    out_dir = Path(out_dir)
    dcr_rows = _hospital_sorted(dcr)
    attack_rows = _hospital_sorted(attacks)
    ledger_rows = _hospital_sorted(ledger)
    decision_rows = [_as_dict(d) for d in decisions]
    gate_results = evaluate_gates(dcr_rows, attack_rows, gates)
    passed = all(g.passed for g in gate_results)
    doc = _jsonable(
        {
            "version": REPORT_VERSION,
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "passed": passed,
            "gates": {
                "thresholds": gates.model_dump(),
                "evaluated_on": "worst hospital and attack",
                "results": [g.model_dump() for g in gate_results],
            },
            "quality": {
                "scores": _as_dict(quality),
                "synthetic_rows": len(synthetic),
                "marginals": _marginals(schema, per_column_reference, synthetic),
                "pair_differences": dict(pair_differences),
            },
            "privacy": {"dcr": dcr_rows, "attacks": attack_rows},
            "ledger": ledger_rows,
            "sadqc": {"decisions": decision_rows},
        }
    )
    html_text = _render_html(doc, schema, gate_results, passed)
    json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    atomic_write_text(json_path, json.dumps(doc, indent=2, allow_nan=False))
    atomic_write_text(html_path, html_text)
    logger.info(
        "audit report written to %s: %s (%s)",
        out_dir,
        "PASS" if passed else "FAIL",
        "; ".join(f"{g.name} {'ok' if g.passed else 'FAILED'}" for g in gate_results),
    )
    return ReportResult(json_path=json_path, html_path=html_path, passed=passed, gates=gate_results)
