"""The report's risk-model section: each model and route as the hospitals scored it under DP
(pooled and per hospital), with its confusion matrix, ROC curve and calibration plot."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.report_blocks import html_img, html_table
from server.report_gates import POOLED
from server.report_plots import png_of

_COLUMNS = ("high_risk_auroc", "macro_f1", "high_risk_f1", "high_risk_recall_at_90_precision", "accuracy")


def confusion_png(row: Mapping[str, Any], classes: Sequence[str]) -> str:
    """The pooled confusion matrix (noisy counts, clipped at 0), rows the truth."""
    table = np.clip(np.asarray(row["confusion"], dtype=np.float64), 0.0, None)

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        ax.imshow(table, cmap="Blues")
        for (i, j), value in np.ndenumerate(table):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(classes)), classes, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{row['model']} ({row['route']})", fontsize=9)

    return png_of(draw, (3.2, 3.0))


def roc_calibration_png(rows: Sequence[Mapping[str, Any]], flagged: str) -> str:
    """The flagged class's binned ROC and its calibration (observed share per score bin), one line
    per model and route, pooled over the hospitals."""

    def draw(fig: Any) -> None:
        roc, calibration = fig.subplots(1, 2)
        for row in rows:
            label = f"{row['model']} ({row['route']})"
            roc.plot(
                row["roc_fpr"], row["roc_tpr"], linewidth=1.4, label=f"{label} {row['high_risk_auroc']:.3f}"
            )
            observed = np.array(
                [np.nan if v is None else v for v in row["calibration_observed"]], dtype=float
            )
            calibration.plot(row["calibration_forecast"], observed, marker="o", markersize=3, linewidth=1.2)
        roc.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
        calibration.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
        roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{flagged} vs the rest")
        calibration.set(
            xlabel="predicted probability (bin centre)", ylabel="observed share", title="calibration"
        )
        calibration.set_ylim(-0.05, 1.05)
        roc.legend(fontsize=6)
        for ax in (roc, calibration):
            ax.title.set_fontsize(9)
            ax.tick_params(labelsize=7)

    return png_of(draw, (8.0, 3.3))


def risk_section(evaluation: Mapping[str, Any], classes: Sequence[str], label: str) -> str:
    """The section, or a note that the run evaluated no risk model at the hospitals."""
    rows = list(evaluation.get("rows") or [])
    out = ['<section id="risk-models"><h2>Risk models at the hospitals (DP)</h2>']
    if not rows:
        out.append('<p class="note">No risk model was evaluated at the hospitals in this run.</p></section>')
        return "".join(out)
    out.append(
        '<p class="note">Each hospital scored every model on its held-out patients and released the '
        "confusion and flagged-score tables once, with Gaussian noise charged to its ledger; the "
        "figures below are computed from those noisy tables (AUROC and calibration on public score "
        "bins), pooled by adding the hospitals' tables. The high_risk figures are those of the "
        f"flagged class, the last category of the label: {html.escape(label)} = "
        f"{html.escape(classes[-1])}.</p>"
    )
    headers = ["model", "route", "hospital", *_COLUMNS, "patients (noisy)", "noise sd per count"]
    table_rows = [
        [r["model"], r["route"], r["hospital"], *(r[c] for c in _COLUMNS), r["patients"], r["noise_sd"]]
        for r in rows
    ]
    out.append(html_table(headers, table_rows, element_id="risk-table"))
    pooled = [r for r in rows if r["hospital"] == POOLED]
    out.append(html_img(roc_calibration_png(pooled, classes[-1]), "ROC and calibration of every risk model"))
    out += [
        html_img(confusion_png(r, classes), f"confusion matrix of {r['model']} ({r['route']})")
        for r in pooled
    ]
    refusals = evaluation.get("refusals") or []
    if refusals:
        out.append(html_table(["hospital", "refused"], [[r["hospital"], r["reason"]] for r in refusals]))
    out.append("</section>")
    return "".join(out)
