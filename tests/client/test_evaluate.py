"""`mindfed evaluate` / `compare` scoring: SDMetrics' numbers, the right order, and a browsable report."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sdmetrics.reports.utils import DEFAULT_REAL_ASSOCIATION_THRESHOLD, DEFAULT_REAL_CORRELATION_THRESHOLD
from threadpoolctl import threadpool_limits

from client.evaluate import (
    ASSOCIATION_THRESHOLD,
    CORRELATION_THRESHOLD,
    Evaluation,
    EvaluationInputError,
    Table,
    evaluate_tables,
    load_inputs,
    load_table,
    quality_scores,
    tstr_scores,
)
from client.evaluate_report import write_evaluation_report
from configs.schema import load_schema
from simulation.cohort import generate_demo_cohort, write_cohort_folder
from simulation.evaluation import quality_report
from tests.support.browser import chromium, needs_chromium

SCHEMA = load_schema()
EVIL = "<script>alert('x')</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """HistGradientBoosting's OpenMP threads crawl on a busy 2-core machine; one thread does not."""
    with threadpool_limits(1):
        yield


def _real() -> pd.DataFrame:
    return generate_demo_cohort(400, seed=1).static


def _holdout() -> pd.DataFrame:
    static = generate_demo_cohort(300, seed=3).static
    return static.assign(patient_id="H" + static["patient_id"])  # other patients than --real's


def _draw() -> pd.DataFrame:
    """A good generator: a fresh draw from the same population."""
    return generate_demo_cohort(300, seed=2).static


def _shuffled() -> pd.DataFrame:
    """A broken one: every column permuted on its own, so marginals hold and every trend is gone."""
    static = _draw()
    rng = np.random.default_rng(0)
    return static.assign(**{c: rng.permutation(static[c].to_numpy()) for c in SCHEMA.column_names})


def _perturbed() -> pd.DataFrame:
    """A biased one: ages shifted, a tenth of the labels redrawn."""
    static = generate_demo_cohort(500, seed=5).static
    rng = np.random.default_rng(1)
    flip = rng.random(len(static)) < 0.1
    static.loc[flip, "risk_level"] = rng.choice(["low", "moderate", "high"], size=int(flip.sum()))
    return static.assign(age=np.clip(static["age"] + 12, 18, 90))


def _table(name: str, frame: pd.DataFrame) -> Table:
    return Table(name=name, source=Path(f"{name}.csv"), static=frame, has_ids=True)


# ---------------------------------------------------------------- SDMetrics agreement
def test_thresholds_are_sdmetrics_defaults() -> None:
    assert CORRELATION_THRESHOLD == DEFAULT_REAL_CORRELATION_THRESHOLD
    assert ASSOCIATION_THRESHOLD == DEFAULT_REAL_ASSOCIATION_THRESHOLD


@pytest.mark.parametrize("make", [_draw, _shuffled, _perturbed])
def test_quality_matches_sdmetrics_quality_report(make) -> None:
    real, synthetic = _real(), make()
    reference = quality_report(real, synthetic, SCHEMA)
    ours = quality_scores(real, synthetic, SCHEMA)

    assert ours.column_shapes == pytest.approx(reference["column_shapes"], abs=0.005)
    assert ours.column_pair_trends == pytest.approx(reference["column_pair_trends"], abs=0.005)
    assert ours.overall == pytest.approx(reference["overall"], abs=0.005)
    counted = {key for key, score in reference["pair_trends"].items() if not math.isnan(score)}
    assert counted == {key for key, trend in ours.per_pair.items() if trend.counted}
    assert len(counted) >= 5  # the demo's real trends: DASS scores with each other and the label
    for key in counted:
        assert ours.per_pair[key].score == pytest.approx(reference["pair_trends"][key], abs=0.005), key


# ---------------------------------------------------------------- scores in the right order
@pytest.fixture(scope="module")
def evaluation() -> Evaluation:
    real = _table("real", _real())
    tables = [_table("draw", _draw()), _table("shuffled", _shuffled()), _table("copy", _real())]
    with threadpool_limits(1):
        return evaluate_tables(real, tables, SCHEMA, holdout=_table("holdout", _holdout()), n_bootstrap=50)


def test_a_broken_table_scores_below_a_fresh_draw(evaluation: Evaluation) -> None:
    draw, shuffled, copy = evaluation.tables
    assert abs(draw.quality.column_shapes - shuffled.quality.column_shapes) < 1e-9  # same marginals
    assert draw.quality.column_pair_trends > shuffled.quality.column_pair_trends + 0.1
    assert draw.quality.overall > shuffled.quality.overall
    assert copy.quality.column_shapes == pytest.approx(1.0) and copy.quality.overall == pytest.approx(1.0)
    assert draw.tstr["auroc"] > 0.85 and shuffled.tstr["auroc"] < 0.65
    assert draw.tstr["macro_f1"] > shuffled.tstr["macro_f1"] + 0.2
    assert evaluation.tstr_baseline is not None and evaluation.tstr_baseline["auroc"] > 0.85


def test_a_memorised_table_fails_the_privacy_checks(evaluation: Evaluation) -> None:
    draw, _, copy = evaluation.tables
    assert draw.dcr is not None and copy.dcr is not None
    assert draw.dcr.score > 0.8 and copy.dcr.score < 0.5
    # members are subsampled to the holdout's 300, so 300 of the 400 copies sit on a member
    assert copy.dcr.closer_to_training > 0.8 and copy.dcr.median_dcr_training == 0.0
    assert {a.name for a in draw.attacks} == {"distance", "domias", "classifier"}
    assert draw.worst_attack_auc is not None and draw.worst_attack_auc < 0.65
    distance = {t.name: next(a.auc for a in t.attacks if a.name == "distance") for t in (draw, copy)}
    assert distance["copy"] > 0.9 > distance["draw"]


def test_without_holdout_there_are_no_attacks() -> None:
    real, table = _table("real", _real()), _table("draw", _draw())
    result = evaluate_tables(real, [table], SCHEMA)
    assert result.holdout is None and result.tstr_baseline is None
    assert result.tables[0].dcr is None and result.tables[0].attacks == []


def test_a_collapsed_table_gets_a_constant_classifier() -> None:
    collapsed = _draw().assign(risk_level="low")  # a generator that only ever says "low"
    scores = tstr_scores(collapsed, _real(), SCHEMA, seed=0)
    assert scores["auroc"] == 0.5 and scores["high_risk_f1"] == 0.0


# ---------------------------------------------------------------- the report
class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.sources += [value or "" for name, value in attrs if name in {"src", "href", "srcset", "data"}]


@pytest.fixture(scope="module")
def report(evaluation: Evaluation, tmp_path_factory: pytest.TempPathFactory):
    renamed = evaluation.model_copy(deep=True)
    renamed.tables[1].name = EVIL
    return write_evaluation_report(renamed, SCHEMA, tmp_path_factory.mktemp("evaluation"))


def test_json_is_strict_and_has_every_table(report) -> None:
    doc = json.loads(report.json_path.read_text(encoding="utf-8"), parse_constant=pytest.fail)
    assert [t["name"] for t in doc["tables"]] == ["draw", EVIL, "copy"]
    assert doc["real"]["rows"] == 400 and doc["holdout"]["rows"] == 300 and doc["label"] == "risk_level"
    first = doc["tables"][0]
    assert set(first["quality"]["per_column"]) == set(SCHEMA.column_names)
    assert len(first["quality"]["per_pair"]) == 36 and len(first["attacks"]) == 3
    assert sum(first["marginals"]["gender"]) == pytest.approx(1.0)
    assert not list(report.json_path.parent.glob(".*.tmp"))


def test_html_is_self_contained_and_escaped(report) -> None:
    text = report.html_path.read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(text)
    assert "http://" not in text and "https://" not in text
    assert {"script", "link", "iframe"}.isdisjoint(parser.tags)
    assert EVIL not in text and "&lt;script&gt;" in text
    # 9 marginals + a heatmap and a DCR plot per table + one ROC per attack
    assert len(parser.sources) == 9 + 3 + 3 + 3
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_MAGIC)
    for section in ("summary", "column-shapes", "pair-trends", "tstr", "privacy", "marginals"):
        assert f'id="{section}"' in text


@needs_chromium
def test_chromium_renders_every_table_side_by_side(report, tmp_path: Path) -> None:
    run = chromium(["--dump-dom", report.html_path.as_uri()], tmp_path / "profile")
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    summary = dom[dom.index('id="summary-table"') : dom.index("</table>", dom.index('id="summary-table"'))]
    assert len(re.findall(r"<tr>", summary)) == 4  # the header and three tables
    assert "draw" in summary and "copy" in summary and "&lt;script&gt;" in summary
    assert dom.count("<img") == 18


# ---------------------------------------------------------------- inputs
@pytest.fixture
def files(tmp_path: Path) -> Path:
    write_cohort_folder(generate_demo_cohort(60, seed=4), tmp_path / "real")
    _draw().head(80).to_csv(tmp_path / "a.csv", index=False)
    return tmp_path


def test_a_folder_without_weeks_and_a_csv_without_ids_load(files: Path) -> None:
    (files / "real" / "timeseries.csv").unlink()
    _draw().head(80).drop(columns="patient_id").to_csv(files / "no_ids.csv", index=False)
    real, tables, _ = load_inputs(files / "real", [files / "a.csv", files / "no_ids.csv"], SCHEMA)
    assert len(real.static) == 60 and [t.name for t in tables] == ["a", "no_ids"]
    assert tables[0].has_ids and not tables[1].has_ids
    pd.testing.assert_frame_equal(
        tables[0].static[SCHEMA.column_names], tables[1].static[SCHEMA.column_names], check_dtype=False
    )


def test_a_bad_cell_names_the_csv_line_and_column(files: Path) -> None:
    frame = pd.read_csv(files / "a.csv").astype({"bmi": object})
    frame.loc[4, "bmi"] = "heavy"
    frame.to_csv(files / "a.csv", index=False)
    with pytest.raises(EvaluationInputError, match=r"--synthetic .*a\.csv is invalid") as caught:
        load_table(files / "a.csv", SCHEMA, option="--synthetic")
    assert "a.csv, line 6, column 'bmi': 'heavy' is not a number" in str(caught.value)


def test_a_holdout_sharing_patients_with_real_is_refused(files: Path) -> None:
    write_cohort_folder(generate_demo_cohort(60, seed=5), files / "holdout")  # the same P000001.. ids
    with pytest.raises(EvaluationInputError, match="shares 60 patient ids with --real"):
        load_inputs(files / "real", [files / "a.csv"], SCHEMA, holdout=files / "holdout")


@pytest.mark.parametrize(
    ("names", "message"),
    [(["x", "y"], "--names gives 2 names for 1 --synthetic table$"), ([" "], "a table name is empty")],
)
def test_names_must_fit_the_tables(files: Path, names: list[str], message: str) -> None:
    with pytest.raises(EvaluationInputError, match=message):
        load_inputs(files / "real", [files / "a.csv"], SCHEMA, names=names)


def test_repeated_names_are_refused(files: Path) -> None:
    with pytest.raises(EvaluationInputError, match=r"table names repeat: \['a'\]"):
        load_inputs(files / "real", [files / "a.csv", files / "a.csv"], SCHEMA)
