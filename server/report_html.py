"""Audit report HTML: one self-contained page, every input string escaped, plots as data URIs."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from configs.schema import CohortSchema
from server.report_gates import GateResult, finite
from server.report_plots import dcr_png, heatmap_png, marginal_png, roc_png, timeline_png

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


# ---------------------------------------------------------------------------- sections
def _header(doc: Mapping[str, Any], passed: bool) -> str:
    verdict = "PASS" if passed else "FAIL"
    cls = "pass" if passed else "fail"
    return (
        f"<h1>MindFed audit report</h1><p class='note'>generated {html.escape(doc['generated'])}</p>"
        f'<p class="banner {cls}">Overall: {verdict}</p>'
    )


def _gates_section(gate_results: list[GateResult]) -> str:
    table = _table(
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
        out.append(_table(list(headline), [list(headline.values())]))
    extra = {k: v for k, v in scores.items() if k not in {*headline, "per_column", "per_pair"}}
    if extra:
        out.append(_table(["item", "value"], [[k, v] for k, v in extra.items()]))
    return out


def _quality_section(quality: Mapping[str, Any], schema: CohortSchema) -> str:
    scores = quality.get("scores") or {}
    per_column = scores.get("per_column") or {}
    out = ['<section id="quality"><h2>Quality: synthetic vs DP reference</h2>', *_score_tables(scores)]
    out.append("<h3>Column marginals</h3><div class='grid'>")
    for spec in schema.columns:
        score = finite(per_column.get(spec.name))
        out.append(_img(marginal_png(spec, quality["marginals"][spec.name], score), f"marginal {spec.name}"))
    out.append("</div><h3>Association differences</h3>")
    out.append(
        "<p class='note'>Synthetic minus DP-reference association per column pair: Pearson's r for "
        "two numeric columns, Cramér's V otherwise (both from the pair tables on public bins).</p>"
    )
    out.append(_img(heatmap_png(schema, quality.get("pair_differences") or {}), "association differences"))
    out.append("</section>")
    return "".join(out)


def _privacy_section(privacy: Mapping[str, Any]) -> str:
    out = ['<section id="privacy"><h2>Privacy audit</h2><h3>Distance to closest record</h3>']
    out.append(_table(_DCR_KEYS, [[d.get(k) for k in _DCR_KEYS] for d in privacy["dcr"]]))
    out.append("<div class='grid'>")
    for entry in privacy["dcr"]:
        out.append(_img(dcr_png(entry), f"DCR histogram {entry.get('hospital', '?')}"))
    out.append("</div><h3>Membership-inference attacks</h3>")
    out.append(_table(_ATTACK_KEYS, [[a.get(k) for k in _ATTACK_KEYS] for a in privacy["attacks"]]))
    # One ROC figure per attack, with a curve for each hospital it was run against.
    by_name: dict[str, list[dict[str, Any]]] = {}
    for entry in privacy["attacks"]:
        by_name.setdefault(str(entry.get("name", "?")), []).append(entry)
    for name, curves in sorted(by_name.items()):
        out.append(_img(roc_png(name, curves), f"ROC {name}"))
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
    parts = [_table(scalar_keys, [[e.get(k) for k in scalar_keys] for e in ledger])]
    for entry in ledger:
        charges = entry.get("entries")
        if isinstance(charges, list) and charges:
            keys = list(dict.fromkeys(k for c in charges for k in c))
            parts.append(f"<h3>charges: {html.escape(str(entry.get('hospital', '?')))}</h3>")
            parts.append(_table(keys, [[c.get(k) for k in keys] for c in charges]))
    return "".join(parts)


def _ledger_section(ledger: list[dict[str, Any]]) -> str:
    return (
        f'<section id="ledger"><h2>Privacy ledger (epsilon per hospital)</h2>{_ledger_html(ledger)}</section>'
    )


def _decisions_table(decisions: list[Mapping[str, Any]]) -> str:
    return _table(
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
        out.append(_img(timeline, "SA-DQC timeline"))
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
            _ledger_section(doc["ledger"]),
            _sadqc_section(doc["sadqc"]["decisions"]),
        ]
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>MindFed audit report</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )
