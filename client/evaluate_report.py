"""report.html and report.json of `mindfed evaluate` / `compare`, built from the audit report's blocks."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.markup import escape
from rich.table import Table

from client.evaluate import Evaluation, TableScores
from configs.schema import CohortSchema
from privacy.attacks import DCRResult
from privacy.storage import atomic_write_text
from server.report_blocks import html_img, html_page, html_table
from server.report_plots import dcr_png, heatmap_png, roc_png, shares_png

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
_TSTR_KEYS = ("auroc", "macro_f1", "high_risk_f1", "high_risk_recall_at_90_precision", "brier")
_DCR_KEYS = ("score", "closer_to_training", "median_dcr_training", "median_dcr_holdout", "mean_nndr")
_ATTACK_KEYS = ("auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "n_members")


@dataclass(frozen=True)
class WrittenReport:
    """Where the evaluation's two files were written."""

    json_path: Path
    html_path: Path


def write_evaluation_report(evaluation: Evaluation, schema: CohortSchema, out_dir: Path) -> WrittenReport:
    """Render both files first, then write each atomically into `out_dir`."""
    page = render_evaluation_html(evaluation, schema)
    doc = evaluation.model_dump_json(indent=2)  # NaN (a score without data) becomes null
    json_path, html_path = Path(out_dir) / REPORT_JSON, Path(out_dir) / REPORT_HTML
    atomic_write_text(json_path, doc + "\n")
    atomic_write_text(html_path, page)
    return WrittenReport(json_path=json_path, html_path=html_path)


def render_evaluation_html(evaluation: Evaluation, schema: CohortSchema) -> str:
    """The whole self-contained page: every table side by side, plots as data URIs."""
    body = "".join(
        [
            _header(evaluation),
            _summary_section(evaluation),
            _shapes_section(evaluation, schema),
            _pairs_section(evaluation),
            _utility_section(evaluation),
            _privacy_section(evaluation),
            _marginals_section(evaluation, schema),
            _differences_section(evaluation, schema),
        ]
    )
    return html_page("MindFed evaluation", body)


# The summary's columns: (short name for the command line, name in the HTML).
SUMMARY_COLUMNS = [
    ("table", "table"), ("rows", "rows"), ("overall", "overall"), ("shapes", "column shapes"),
    ("pairs", "pair trends"), ("TSTR AUROC", "TSTR AUROC"), ("TSTR F1", "TSTR macro-F1"),
    ("attack AUC", "max attack AUC"), ("DCR", "DCR protection"),
]  # fmt: skip


def summary_rows(evaluation: Evaluation) -> list[list[Any]]:
    """One row per synthetic table: the headline figures the HTML and the command line show."""
    return [
        [
            t.name,
            t.rows,
            t.quality.overall,
            t.quality.column_shapes,
            t.quality.column_pair_trends,
            t.tstr.get("auroc"),
            t.tstr.get("macro_f1"),
            t.worst_attack_auc,
            t.dcr.score if t.dcr else None,
        ]
        for t in evaluation.tables
    ]


def summary_table(evaluation: Evaluation) -> Table:
    """The summary for the terminal (rich), with the short column names."""
    table = Table(
        title=f"synthetic vs {escape(evaluation.real.source)} ({evaluation.real.rows} patients)",
        box=box.SIMPLE_HEAD,
    )
    for index, (header, _) in enumerate(SUMMARY_COLUMNS):
        widest = max(len(word) for word in header.split())  # headers wrap between words, never inside
        justify = "left" if index == 0 else "right"
        table.add_column(header, justify=justify, min_width=widest, overflow="fold")
    for row in summary_rows(evaluation):
        table.add_row(*(_terminal_cell(value) for value in row))
    return table


def _terminal_cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return "–" if value is None else escape(str(value))


# ---------------------------------------------------------------------------- sections
def _section(ident: str, title: str, *parts: str) -> str:
    return f'<section id="{ident}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _header(evaluation: Evaluation) -> str:
    real, held = evaluation.real, evaluation.holdout
    lines = [
        f"generated {evaluation.generated}",
        f"real: {real.source} ({real.rows} patients)",
        f"holdout: {held.source} ({held.rows} patients)" if held else "holdout: none (no privacy attacks)",
        f"label for train-on-synthetic, test-on-real: {evaluation.label}",
    ]
    return "<h1>MindFed evaluation: synthetic vs real</h1>" + "".join(_note(line) for line in lines)


def _summary_section(evaluation: Evaluation) -> str:
    return _section(
        "summary",
        "Summary",
        _note(
            "overall = mean of column shapes and pair trends, as SDMetrics' QualityReport; TSTR: a "
            "classifier of the label trained on the synthetic table, scored on the real one."
        ),
        html_table(
            [long for _, long in SUMMARY_COLUMNS], summary_rows(evaluation), element_id="summary-table"
        ),
    )


def _names(evaluation: Evaluation) -> list[str]:
    return [t.name for t in evaluation.tables]


def _shapes_section(evaluation: Evaluation, schema: CohortSchema) -> str:
    rows = [
        [
            spec.name,
            "TVComplement" if spec.is_categorical else "KSComplement",
            *(t.quality.per_column[spec.name] for t in evaluation.tables),
        ]
        for spec in schema.columns
    ]
    return _section(
        "column-shapes",
        "Column shapes",
        html_table(["column", "metric", *_names(evaluation)], rows, element_id="shapes-table"),
    )


def _pairs_section(evaluation: Evaluation) -> str:
    first = evaluation.tables[0].quality.per_pair
    rows = [
        [
            key,
            trend.metric,
            trend.real,
            trend.counted,
            *(t.quality.per_pair[key].score for t in evaluation.tables),
        ]
        for key, trend in first.items()
    ]
    thresholds = evaluation.thresholds
    return _section(
        "pair-trends",
        "Column pair trends",
        _note(
            f"As SDMetrics' QualityReport, a pair counts towards the pair-trend score only where the real "
            f"table shows a trend: |Pearson r| above {thresholds['correlation']:g} for two numeric columns "
            f"(CorrelationSimilarity), Cramér's V above {thresholds['association']:g} otherwise "
            "(ContingencySimilarity, numeric columns cut into 10 equal-width bins over each table's range)."
        ),
        html_table(
            ["pair", "metric", "real trend", "counted", *_names(evaluation)], rows, element_id="pairs-table"
        ),
    )


def _utility_section(evaluation: Evaluation) -> str:
    rows = [[t.name, "synthetic", *(t.tstr.get(k) for k in _TSTR_KEYS)] for t in evaluation.tables]
    if evaluation.tstr_baseline is not None:
        rows.append(["holdout", "real (baseline)", *(evaluation.tstr_baseline.get(k) for k in _TSTR_KEYS)])
    return _section(
        "tstr",
        "Train on synthetic, test on real",
        _note(
            "A gradient-boosting classifier of the label per training table; the real table is the test set."
        ),
        html_table(["trained on", "kind", *_TSTR_KEYS], rows, element_id="tstr-table"),
    )


def _privacy_section(evaluation: Evaluation) -> str:
    if evaluation.holdout is None:
        return _section(
            "privacy", "Privacy", _note("No --holdout was given: no DCR and no membership attacks.")
        )
    scored = [t for t in evaluation.tables if t.dcr is not None]
    dcr_rows = [[t.name, *(getattr(t.dcr, k) for k in _DCR_KEYS)] for t in scored]
    attack_rows = [
        [t.name, a.name, *(getattr(a, k) for k in _ATTACK_KEYS)] for t in scored for a in t.attacks
    ]
    curves: dict[str, list[dict[str, Any]]] = {}
    for table in scored:
        for attack in table.attacks:
            curves.setdefault(attack.name, []).append(
                {"label": table.name, "auc": attack.auc, "roc_fpr": attack.roc_fpr, "roc_tpr": attack.roc_tpr}
            )
    return _section(
        "privacy",
        "Privacy: distance to closest record and membership attacks",
        _note(
            "Members are the --real patients (the generator's training data), non-members the --holdout "
            "patients: half of them are attack candidates, the other half the attacker's reference sample. "
            "DCR protection 1 = synthetic rows sit no closer to members than to non-members; attack AUC 0.5 "
            "= chance."
        ),
        html_table(["table", *_DCR_KEYS], dcr_rows, element_id="dcr-table"),
        "<div class='grid'>",
        *(html_img(_dcr_plot(t.name, t.dcr), f"DCR {t.name}") for t in scored if t.dcr is not None),
        "</div>",
        html_table(["table", "attack", *_ATTACK_KEYS], attack_rows, element_id="attacks-table"),
        *(html_img(roc_png(name, entries), f"ROC {name}") for name, entries in sorted(curves.items())),
    )


def _dcr_plot(name: str, dcr: DCRResult) -> str:
    """Synthetic rows' distance to the closest member and non-member, over the occupied bins."""
    members = np.asarray(dcr.dcr_training_counts, dtype=np.float64)
    holdout = np.asarray(dcr.dcr_holdout_counts, dtype=np.float64)
    occupied = np.flatnonzero(members + holdout)
    low, high = (occupied[0], occupied[-1] + 1) if occupied.size else (0, members.size)
    total = max(float(dcr.n_synthetic), 1.0)
    entry = {
        "hospital": name,
        "score": dcr.score,
        "members_share": (members[low:high] / total).tolist(),
        "nonmembers_share": (holdout[low:high] / total).tolist(),
    }
    return dcr_png(
        entry,
        labels=("to the closest member (--real)", "to the closest non-member (--holdout)"),
        xlabel="distance bin (log-spaced, nearest on the left)",
        ylabel="share of synthetic rows",
    )


def _marginals_section(evaluation: Evaluation, schema: CohortSchema) -> str:
    one = evaluation.tables[0] if len(evaluation.tables) == 1 else None
    images = []
    for spec in schema.columns:
        series = {"real": evaluation.real_marginals[spec.name]}
        series |= {t.name: t.marginals[spec.name] for t in evaluation.tables}
        title = spec.name if one is None else f"{spec.name} (shape {one.quality.per_column[spec.name]:.3f})"
        images.append(html_img(shares_png(spec, series, title=title), f"marginal {spec.name}"))
    return _section("marginals", "Column marginals", "<div class='grid'>", *images, "</div>")


def _differences_section(evaluation: Evaluation, schema: CohortSchema) -> str:
    images = [
        html_img(_difference_plot(table, schema), f"pair trends {table.name}") for table in evaluation.tables
    ]
    return _section(
        "pair-differences",
        "Pair-trend differences",
        _note(
            "Synthetic minus real trend per pair: Pearson's r for two numeric columns, Cramér's V otherwise."
        ),
        "<div class='grid'>",
        *images,
        "</div>",
    )


def _difference_plot(table: TableScores, schema: CohortSchema) -> str:
    differences = {key: p.synthetic - p.real for key, p in table.quality.per_pair.items()}
    return heatmap_png(
        schema,
        differences,
        title=f"{table.name}: synthetic - real trend (Pearson r / Cramér's V)",
        colorbar_label="synthetic - real association",
    )
