"""Audit report HTML: one self-contained page, every input string escaped, plots as data URIs."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from configs.schema import CohortSchema
from server.report_blocks import html_img, html_page, html_table
from server.report_gates import GateResult, finite
from server.report_plots import dcr_png, heatmap_png, marginal_png, roc_png, timeline_png
from server.report_risk import risk_section

_DCR_KEYS = [
    "hospital", "score", "closer_to_training", "closest_bin_members", "closest_bin_nonmembers",
    "n_members", "n_nonmembers",
]  # fmt: skip
_ATTACK_KEYS = [
    "hospital", "name", "auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci_low",
    "tpr_at_1pct_fpr_ci_high", "tpr_at_01pct_fpr", "n_members", "n_nonmembers", "noise_sd",
]  # fmt: skip
_HEADLINE_SCORES = ("overall", "column_shape", "pair_trends", "violations_rate")


# ---------------------------------------------------------------------------- helpers
# ---------------------------------------------------------------------------- sections
def _header(doc: Mapping[str, Any], passed: bool) -> str:
    verdict = "PASS" if passed else "FAIL"
    cls = "pass" if passed else "fail"
    return (
        f"<h1>MindFed audit report</h1><p class='note'>generated {html.escape(doc['generated'])}</p>"
        f'<p class="banner {cls}">Overall: {verdict}</p>'
    )


def _gates_section(gate_results: list[GateResult]) -> str:
    table = html_table(
        ["gate", "worst value", "threshold", "worst at", "result"],
        [
            [g.name, g.value, f"{g.comparator} {g.threshold:g}", g.worst, "PASS" if g.passed else "FAIL"]
            for g in gate_results
        ],
        element_id="gates-table",
        row_classes=["pass" if g.passed else "fail" for g in gate_results],
    )
    return (
        '<section id="gates"><h2>Pass/fail gates</h2>'
        '<p class="note">Every figure comes from the hospitals\' noisy attack-score histograms (a DP '
        "release each). The first four gates are evaluated on all hospitals pooled, on the worst "
        "attack; the last asks that no single hospital's attack AUC is significantly above the AUC "
        "gate (its 95% interval, which covers sampling and the release's noise). A gate without "
        "results fails.</p>"
        f"{table}</section>"
    )


def _score_tables(scores: Mapping[str, Any]) -> list[str]:
    """The headline quality scores, then any other scalars (e.g. filter counts) as item/value rows."""
    out: list[str] = []
    headline = {k: scores.get(k) for k in _HEADLINE_SCORES}
    if any(v is not None for v in headline.values()):
        out.append(html_table(list(headline), [list(headline.values())]))
    extra = {k: v for k, v in scores.items() if k not in {*headline, "per_column", "per_pair"}}
    if extra:
        out.append(html_table(["item", "value"], [[k, v] for k, v in extra.items()]))
    return out


def _quality_section(quality: Mapping[str, Any], schema: CohortSchema) -> str:
    scores = quality.get("scores") or {}
    per_column = scores.get("per_column") or {}
    out = ['<section id="quality"><h2>Quality: synthetic vs DP reference</h2>', *_score_tables(scores)]
    out.append("<h3>Column marginals</h3><div class='grid'>")
    for spec in schema.columns:
        score = finite(per_column.get(spec.name))
        out.append(
            html_img(marginal_png(spec, quality["marginals"][spec.name], score), f"marginal {spec.name}")
        )
    out.append("</div><h3>Association differences</h3>")
    out.append(
        "<p class='note'>Synthetic minus DP-reference association per column pair: Pearson's r for "
        "two numeric columns, Cramér's V otherwise (both from the pair tables on public bins).</p>"
    )
    out.append(
        html_img(heatmap_png(schema, quality.get("pair_differences") or {}), "association differences")
    )
    out.append("</section>")
    return "".join(out)


def _privacy_section(privacy: Mapping[str, Any]) -> str:
    out = ['<section id="privacy"><h2>Privacy audit</h2><h3>Distance to closest record</h3>']
    out.append(html_table(_DCR_KEYS, [[d.get(k) for k in _DCR_KEYS] for d in privacy["dcr"]]))
    out.append("<div class='grid'>")
    for entry in privacy["dcr"]:
        out.append(html_img(dcr_png(entry), f"DCR histogram {entry.get('hospital', '?')}"))
    out.append("</div><h3>Membership-inference attacks</h3>")
    out.append(html_table(_ATTACK_KEYS, [[a.get(k) for k in _ATTACK_KEYS] for a in privacy["attacks"]]))
    # One ROC figure per attack, with a curve for each hospital it was run against.
    by_name: dict[str, list[dict[str, Any]]] = {}
    for entry in privacy["attacks"]:
        by_name.setdefault(str(entry.get("name", "?")), []).append(entry)
    for name, curves in sorted(by_name.items()):
        out.append(html_img(roc_png(name, curves), f"ROC {name}"))
    out.append("</section>")
    return "".join(out)


def _ledger_html(ledger: list[dict[str, Any]]) -> str:
    if not ledger:
        return '<p class="note">No ledger entries were reported.</p>'
    # Hospitals may report different scalar fields: the table has the union, in first-seen order.
    scalar_keys: list[str] = []
    for entry in ledger:
        for key, value in entry.items():
            if not isinstance(value, list | dict) and key not in scalar_keys:
                scalar_keys.append(key)
    parts = [html_table(scalar_keys, [[e.get(k) for k in scalar_keys] for e in ledger])]
    for entry in ledger:
        charges = entry.get("entries")
        if isinstance(charges, list) and charges:
            keys = list(dict.fromkeys(k for c in charges for k in c))
            parts.append(f"<h3>charges: {html.escape(str(entry.get('hospital', '?')))}</h3>")
            parts.append(html_table(keys, [[c.get(k) for k in keys] for c in charges]))
    return "".join(parts)


def _ledger_section(ledger: list[dict[str, Any]]) -> str:
    return (
        f'<section id="ledger"><h2>Privacy ledger (epsilon per hospital)</h2>{_ledger_html(ledger)}</section>'
    )


def _decisions_table(decisions: list[Mapping[str, Any]]) -> str:
    return html_table(
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


def _sadqc_section(decisions: list[Mapping[str, Any]]) -> str:
    out = ['<section id="sadqc"><h2>SA-DQC decisions</h2>']
    timeline = timeline_png(decisions)
    if timeline:
        out.append(html_img(timeline, "SA-DQC timeline"))
    if decisions:
        out.append(_decisions_table(decisions))
    else:
        out.append('<p class="note">No SA-DQC decisions were logged.</p>')
    out.append("</section>")
    return "".join(out)


def render_html(
    doc: dict[str, Any], schema: CohortSchema, gate_results: list[GateResult], passed: bool
) -> str:
    """The whole report page from the report's JSON document and its gate results."""
    body = "".join(
        [
            _header(doc, passed),
            _gates_section(gate_results),
            _quality_section(doc["quality"], schema),
            _privacy_section(doc["privacy"]),
            risk_section(
                doc.get("risk_models") or {},
                schema.column(schema.label_column).categories or (),
                schema.label_column,
            ),
            _ledger_section(doc["ledger"]),
            _sadqc_section(doc["sadqc"]["decisions"]),
        ]
    )
    return html_page("MindFed audit report", body)
