"""Tests for server.report: report.json sections, a self-contained report.html, and the gates."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from configs.schema import CohortSchema, load_schema
from models.pairs import association_differences, pair_counts
from models.statistics import histogram_counts
from privacy.attacks import FPR_GRID
from privacy.dp_audit import attack_figures, audit_histograms, dcr_protection
from server.report import GateThresholds, evaluate_gates, write_report
from server.sadqc import SADQC, score_sample
from simulation.cohort import generate_demo_cohort
from tests.support.browser import chromium as _chromium
from tests.support.browser import needs_chromium

SCHEMA = load_schema()
EVIL = "<script>alert('x')</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _attack(hospital: str, name: str, auc: float) -> dict:
    """AttackResult-like dict whose ROC is tpr = fpr ** k, for which AUC = 1 / (1 + k)."""
    k = 1.0 / auc - 1.0
    fpr = np.asarray(FPR_GRID)
    return {
        "hospital": hospital,
        "name": name,
        "auc": auc,
        "auc_ci_low": auc - 0.03,
        "auc_ci_high": auc + 0.03,
        "tpr_at_1pct_fpr": 0.01**k,
        "tpr_at_1pct_fpr_ci_low": 0.01**k / 2,
        "tpr_at_1pct_fpr_ci_high": min(1.0, 0.01**k * 2),
        "tpr_at_01pct_fpr": 0.001**k,
        "n_members": 300,
        "n_nonmembers": 300,
        "roc_fpr": FPR_GRID,
        "roc_tpr": tuple(float(v) for v in fpr**k),
    }


def _dcr(hospital: str, seed: int) -> dict:
    """A DCR row as the server derives it from one hospital's noisy distance histograms."""
    rng = np.random.default_rng(seed)
    counts, _ = audit_histograms(*(rng.normal(size=(n, 4)) for n in (900, 400, 600, 600)))
    parts = [(counts["distance"] + rng.normal(0, 1.0, counts["distance"].shape), 1.0)]
    figures = attack_figures(parts, n_bootstrap=20, seed=seed)
    shares = counts["distance"] / counts["distance"].sum(axis=1, keepdims=True)
    return {
        "hospital": hospital,
        **dcr_protection(figures, parts),
        "members_share": shares[0].tolist(),
        "nonmembers_share": shares[1].tolist(),
    }


def _ledger(hospital: str) -> dict:
    return {
        "hospital": hospital,
        "epsilon": 2.5,
        "delta": 1e-5,
        "max_epsilon": 4.0,
        "entries": [
            {"what": "handshake statistics", "mechanism": "gaussian", "noise_multiplier": 4.2,
             "sample_rate": 1.0, "steps": 1, "epsilon_after": 0.9},
            {"what": "generator round 1", "mechanism": "dp-sgd", "noise_multiplier": 1.1,
             "sample_rate": 0.05, "steps": 40, "epsilon_after": 2.5},
        ],
    }  # fmt: skip


def _report_inputs(schema: CohortSchema, auc: float, hospitals: list[str], attack_names: list[str]) -> dict:
    real = generate_demo_cohort(1500, seed=0).static
    synthetic = generate_demo_cohort(600, seed=9).static.drop(columns=["patient_id"])
    histograms = histogram_counts(real, schema)
    pairs = pair_counts(real, schema)
    scores = score_sample(synthetic, histograms, pairs, schema)
    sadqc = SADQC(stage="generator")
    for r, s in enumerate([0.80, 0.86, 0.84, 0.70, 0.88], start=1):
        sadqc.observe_round(r, scores.model_copy(update={"overall": s}))
    sadqc.record_filter(5, n_before=600, removed={"isolation_forest": 6}, scores=scores)
    return {
        "quality": {**scores.model_dump(), "filtered_rows": 6},
        "per_column_reference": histograms,
        "synthetic": synthetic[schema.column_names],
        "schema": schema,
        "pair_differences": association_differences(synthetic, pairs, schema),
        "dcr": [_dcr(h, i) for i, h in enumerate(hospitals)],
        "attacks": [_attack(h, n, auc) for h in hospitals for n in attack_names],
        "ledger": [_ledger(h) for h in hospitals],
        "decisions": sadqc.decisions(),
        "gates": GateThresholds(),
    }


@pytest.fixture(scope="module")
def passing_report(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("report")
    inputs = _report_inputs(SCHEMA, 0.5, ["hospital-b", EVIL], ["distance", "domias", "classifier"])
    return write_report(out, **inputs)


# ---------------------------------------------------------------- JSON
def test_json_has_every_section(passing_report) -> None:
    doc = json.loads(passing_report.json_path.read_text(), parse_constant=pytest.fail)  # no NaN/Infinity
    assert {"gates", "quality", "privacy", "ledger", "sadqc", "passed", "generated"} <= set(doc)
    assert doc["passed"] is True and passing_report.passed
    assert len(doc["gates"]["results"]) == 5 and doc["gates"]["thresholds"]["max_attack_auc"] == 0.55
    quality = doc["quality"]
    assert set(quality["marginals"]) == set(SCHEMA.column_names)
    for column, entry in quality["marginals"].items():
        n_cells = SCHEMA.column(column).n_cells()
        assert len(entry["reference"]) == len(entry["synthetic"]) == len(entry["cells"]) == n_cells
        assert sum(entry["reference"]) == pytest.approx(1.0)
    assert len(quality["pair_differences"]) == 36
    assert quality["scores"]["filtered_rows"] == 6 and quality["synthetic_rows"] == 600
    assert len(doc["privacy"]["dcr"]) == 2 and len(doc["privacy"]["attacks"]) == 6
    assert len(doc["privacy"]["attacks"][0]["roc_tpr"]) == len(FPR_GRID)
    assert [h["hospital"] for h in doc["ledger"]] == sorted(["hospital-b", EVIL])
    actions = [d["action"] for d in doc["sadqc"]["decisions"]]
    assert actions == ["accept", "accept", "keep", "rollback", "accept", "filter"]
    assert all(d["reason"] for d in doc["sadqc"]["decisions"])


# ---------------------------------------------------------------- HTML
class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.stack: list[str] = []
        self.gates_tables = 0
        self.gates_depth: int | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in {"src", "href", "srcset", "action", "data"}:
                self.urls.append((tag, name, value or ""))
        if tag not in {"img", "meta", "br", "hr", "input", "link"}:
            self.stack.append(tag)
            if dict(attrs).get("id") == "gates":
                self.gates_depth = len(self.stack)
        if tag == "table" and self.gates_depth is not None:
            self.gates_tables += 1

    def handle_endtag(self, tag: str) -> None:
        if self.stack and self.stack[-1] == tag:
            if self.gates_depth == len(self.stack):
                self.gates_depth = None
            self.stack.pop()


def test_html_is_self_contained(passing_report) -> None:
    text = passing_report.html_path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, flags=re.IGNORECASE)
    assert "http://" not in text and "https://" not in text
    assert "script" not in parser.tags and "link" not in parser.tags and "iframe" not in parser.tags
    images = [value for tag, name, value in parser.urls if tag == "img"]
    assert [u for u in parser.urls if u[0] != "img"] == []
    # 9 marginals + heatmap + 2 DCR + 3 ROC + timeline
    assert len(images) == 16
    for value in images:
        assert value.startswith("data:image/png;base64,")
        assert base64.b64decode(value.split(",", 1)[1]).startswith(PNG_MAGIC)


def test_html_has_gates_table_and_escapes_text(passing_report) -> None:
    text = passing_report.html_path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    assert 'id="gates"' in text and parser.gates_tables == 1
    assert EVIL not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "Overall: PASS" in text
    for section in ("quality", "privacy", "ledger", "sadqc"):
        assert f'id="{section}"' in text
    assert "rollback" in text and "restoring round 2" in text


# ---------------------------------------------------------------- gates
def test_gates_fail_for_auc_08_and_pass_for_05() -> None:
    dcr = [{"hospital": "h1", "score": 0.97}]
    good = evaluate_gates(dcr, [_attack("h1", "domias", 0.5)], GateThresholds())
    assert all(g.passed for g in good)
    bad = evaluate_gates(dcr, [_attack("h1", "domias", 0.5), _attack("h2", "domias", 0.8)], GateThresholds())
    by_name = {g.name: g for g in bad}
    assert not by_name["membership attack AUC"].passed
    assert by_name["membership attack AUC"].value == pytest.approx(0.8)
    assert by_name["membership attack AUC"].worst == "h2 / domias"  # the worst hospital/attack
    assert not by_name["attack AUC 95% CI upper bound"].passed
    assert not by_name["attack TPR at 1% FPR (interval lower bound)"].passed
    assert by_name["DCR overfitting protection"].passed
    # Configurable thresholds.
    lenient = GateThresholds(max_attack_auc=0.85, max_attack_auc_ci_high=0.9, max_tpr_at_1pct_fpr=0.5)
    assert all(g.passed for g in evaluate_gates(dcr, [_attack("h2", "domias", 0.8)], lenient))


def test_gates_check_dcr_and_fail_closed_without_evidence() -> None:
    attacks = [_attack("h1", "distance", 0.5)]
    low = evaluate_gates([{"hospital": "h1", "score": 0.97}, {"hospital": "h2", "score": 0.85}], attacks,
                         GateThresholds())  # fmt: skip
    dcr_gate = next(g for g in low if g.metric == "score")
    assert not dcr_gate.passed and dcr_gate.worst == "h2" and dcr_gate.value == pytest.approx(0.85)
    empty = evaluate_gates([], [], GateThresholds())
    assert not any(g.passed for g in empty) and {g.worst for g in empty} == {"no results"}
    nan = evaluate_gates([{"hospital": "h1", "score": float("nan")}], attacks, GateThresholds())
    assert not next(g for g in nan if g.metric == "score").passed


def test_failing_report_says_fail(tmp_path: Path) -> None:
    small = CohortSchema(
        id_column=SCHEMA.id_column,
        label_column="risk_level",
        columns=(SCHEMA.column("age"), SCHEMA.column("risk_level")),
    )
    inputs = _report_inputs(small, 0.8, ["h1"], ["domias"])
    result = write_report(tmp_path, **inputs)
    assert not result.passed
    doc = json.loads(result.json_path.read_text())
    assert doc["passed"] is False
    assert [g["passed"] for g in doc["gates"]["results"]] == [False, False, False, True, False]
    text = result.html_path.read_text(encoding="utf-8")
    assert "Overall: FAIL" in text and '<tr class="fail">' in text
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files behind


# ---------------------------------------------------------------- a real browser renders it
@needs_chromium
def test_chromium_renders_the_gates_table(passing_report, tmp_path: Path) -> None:
    run = _chromium(["--dump-dom", passing_report.html_path.as_uri()], tmp_path / "profile")
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    assert 'id="gates"' in dom and 'id="gates-table"' in dom
    gates_part = dom[dom.index('id="gates"') :]
    assert "membership attack AUC" in gates_part and "PASS" in gates_part
    assert dom.count("<img") == 16


@needs_chromium
def test_chromium_screenshot_is_a_png(passing_report, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run = _chromium(
        [f"--screenshot={shot}", "--window-size=1280,2000", passing_report.html_path.as_uri()],
        tmp_path / "profile",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
