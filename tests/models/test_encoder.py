"""Tests for models.encoder: the shared encoder built from a schema and DP histograms only."""

from __future__ import annotations

import json
import string
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.special import ndtri

from configs.schema import CohortSchema, ColumnSpec, load_schema
from models.encoder import EncoderError, TabularEncoder
from models.statistics import histogram_counts
from simulation.cohort import generate_demo_cohort

# The encoder keeps quantiles a hair inside (0, 1) so the probit stays finite. Continuous
# values whose CDF position is at least U_MARGIN from the ends must come back within a tight
# tolerance; every value must come back inside its own bin.
U_MARGIN = 1e-4
Z_MAX = float(ndtri(1 - 1e-9))

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------- strategies
_CATEGORY = st.text(alphabet=string.ascii_letters + string.digits + " _-", min_size=1, max_size=6)


@st.composite
def _column(draw: st.DrawFn, name: str) -> ColumnSpec:
    kind = draw(st.sampled_from(["categorical", "continuous", "integer"]))
    if kind == "categorical":
        categories = draw(st.lists(_CATEGORY, min_size=2, max_size=6, unique=True))
        return ColumnSpec(name=name, kind="categorical", categories=tuple(categories))
    bins = draw(st.none() | st.integers(min_value=2, max_value=40))
    if kind == "integer":
        low = draw(st.integers(min_value=-1000, max_value=1000))
        span = draw(st.integers(min_value=1, max_value=300))
        return ColumnSpec(name=name, kind="integer", min=low, max=low + span, bins=bins)
    low = draw(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False))
    width = draw(st.floats(min_value=1e-2, max_value=1e4, allow_nan=False, allow_infinity=False))
    return ColumnSpec(name=name, kind="continuous", min=low, max=low + width, bins=bins)


@st.composite
def schemas(draw: st.DrawFn) -> CohortSchema:
    """A random mix of column kinds, ranges and categories, with a categorical label column."""
    n = draw(st.integers(min_value=1, max_value=6))
    columns = [draw(_column(f"col_{i}")) for i in range(n)]
    label_categories = draw(st.lists(_CATEGORY, min_size=2, max_size=4, unique=True))
    label = ColumnSpec(name="label", kind="categorical", categories=tuple(label_categories))
    columns.insert(draw(st.integers(min_value=0, max_value=n)), label)
    return CohortSchema(id_column="patient_id", label_column="label", columns=tuple(columns))


# Noisy DP counts: real counts plus Gaussian noise, so some cells go negative. (Totals of
# subnormal size, e.g. [0, 5e-324], underflow the encoder's bin floor to 0: not DP-like.)
_COUNT = st.one_of(
    st.just(0.0),
    st.floats(min_value=-50.0, max_value=-1e-3),
    st.floats(min_value=1e-3, max_value=500.0),
)


@st.composite
def dp_histograms(draw: st.DrawFn, schema: CohortSchema) -> dict[str, np.ndarray]:
    histograms: dict[str, np.ndarray] = {}
    for spec in schema.columns:
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            continue  # a column without a histogram gets a uniform one
        cells = draw(st.lists(_COUNT, min_size=spec.n_cells(), max_size=spec.n_cells()))
        histograms[spec.name] = np.asarray(cells, dtype=np.float64)
    return histograms


def _values(draw: st.DrawFn, spec: ColumnSpec, n: int) -> list[Any]:
    if spec.is_categorical:
        return draw(st.lists(st.sampled_from(spec.categories or ()), min_size=n, max_size=n))
    assert spec.min is not None and spec.max is not None
    if spec.kind == "integer":
        element = st.integers(min_value=int(spec.min), max_value=int(spec.max))
    else:
        element = st.floats(min_value=spec.min, max_value=spec.max, allow_nan=False)
    # bias towards the range ends and the bin edges, where mistakes live
    edges = [float(e) for e in spec.bin_edges() if spec.min <= e <= spec.max]
    if spec.kind == "integer":
        edges = [float(round(e)) for e in edges]
    special = st.sampled_from([spec.min, spec.max, *edges])
    return draw(st.lists(st.one_of(element, special), min_size=n, max_size=n))


@st.composite
def frames(draw: st.DrawFn, schema: CohortSchema) -> pd.DataFrame:
    n = draw(st.integers(min_value=1, max_value=20))
    data = {spec.name: _values(draw, spec, n) for spec in schema.columns}
    frame = pd.DataFrame(data, columns=schema.column_names)
    for spec in schema.columns:
        if spec.kind == "integer":
            frame[spec.name] = frame[spec.name].astype(np.int64)
        elif spec.kind == "continuous":
            frame[spec.name] = frame[spec.name].astype(np.float64)
    return frame


def _spec_entry(encoder: TabularEncoder, name: str) -> dict[str, Any]:
    return next(e for e in json.loads(encoder.to_json())["columns"] if e["name"] == name)


def _quantile(encoder: TabularEncoder, name: str, x: np.ndarray) -> np.ndarray:
    entry = _spec_entry(encoder, name)
    return np.interp(np.asarray(x, dtype=np.float64), entry["edges"], entry["cdf"])


def _assert_inside_schema(frame: pd.DataFrame, schema: CohortSchema) -> None:
    assert list(frame.columns) == schema.column_names
    for spec in schema.columns:
        values = frame[spec.name]
        if spec.is_categorical:
            assert set(values) <= set(spec.categories or ()), spec.name
        else:
            assert values.notna().all(), spec.name
            assert (values >= spec.min).all() and (values <= spec.max).all(), spec.name
            if spec.kind == "integer":
                assert values.dtype == np.int64, spec.name


# ---------------------------------------------------------------- properties
@PROPERTY_SETTINGS
@given(st.data())
def test_transform_then_inverse_round_trips(data: st.DataObject) -> None:
    schema = data.draw(schemas(), label="schema")
    encoder = TabularEncoder.from_histograms(schema, data.draw(dp_histograms(schema), label="histograms"))
    frame = data.draw(frames(schema), label="frame")

    encoded = encoder.transform(frame)
    assert encoded.dtype == np.float32
    assert encoded.shape == (len(frame), encoder.width)
    assert np.isfinite(encoded).all()
    back = encoder.inverse_transform(encoded)
    _assert_inside_schema(back, schema)

    for block, spec in zip(encoder.blocks, schema.columns, strict=True):
        assert block.name == spec.name
        part = encoded[:, block.start : block.start + block.width]
        original = frame[spec.name].to_numpy()
        restored = back[spec.name].to_numpy()
        if spec.is_categorical:
            assert block.width == len(spec.categories or ())
            np.testing.assert_array_equal(part.sum(axis=1), 1.0)
            np.testing.assert_array_equal(restored, original)
            continue
        assert block.width == 1
        assert (np.abs(part[:, 0]) <= Z_MAX).all()
        widths = np.diff(spec.bin_edges())
        # every value comes back inside its own bin, even in empty (floored) tail bins
        assert (np.abs(restored - original) <= widths.max() + 1e-9).all()
        if spec.kind == "integer":
            if np.allclose(widths, 1.0):  # one bin per value: exact
                np.testing.assert_array_equal(restored, original)
        else:
            u = _quantile(encoder, spec.name, original)
            inside = (u >= U_MARGIN) & (u <= 1 - U_MARGIN)
            tolerance = 1e-4 * (spec.max - spec.min)
            np.testing.assert_allclose(restored[inside], original[inside], rtol=0, atol=tolerance)


@PROPERTY_SETTINGS
@given(st.data())
def test_inverse_of_any_matrix_stays_inside_the_schema(data: st.DataObject) -> None:
    schema = data.draw(schemas(), label="schema")
    encoder = TabularEncoder.from_histograms(schema, data.draw(dp_histograms(schema), label="histograms"))
    n = data.draw(st.integers(min_value=0, max_value=30), label="n")
    seed = data.draw(st.integers(min_value=0, max_value=2**32 - 1), label="seed")
    scale = data.draw(st.sampled_from([0.1, 1.0, 10.0, 1e4]), label="scale")
    matrix = (np.random.default_rng(seed).normal(size=(n, encoder.width)) * scale).astype(np.float32)
    back = encoder.inverse_transform(matrix)
    assert len(back) == n
    _assert_inside_schema(back, schema)


@PROPERTY_SETTINGS
@given(st.data())
def test_json_round_trip_preserves_hash_and_transform(data: st.DataObject) -> None:
    schema = data.draw(schemas(), label="schema")
    encoder = TabularEncoder.from_histograms(schema, data.draw(dp_histograms(schema), label="histograms"))
    again = TabularEncoder.from_json(encoder.to_json(), schema)
    assert again.hash == encoder.hash
    assert again.to_json() == encoder.to_json()
    assert again.width == encoder.width
    assert again.blocks == encoder.blocks
    frame = data.draw(frames(schema), label="frame")
    np.testing.assert_array_equal(again.transform(frame), encoder.transform(frame))
    # the hash is a function of the histograms: rebuilding gives the same one
    assert TabularEncoder.from_histograms(schema, {}).hash == TabularEncoder.from_histograms(schema, {}).hash


@PROPERTY_SETTINGS
@given(st.data())
def test_from_json_refuses_an_encoder_built_for_another_schema(data: st.DataObject) -> None:
    schema = data.draw(schemas(), label="schema")
    encoder = TabularEncoder.from_histograms(schema, data.draw(dp_histograms(schema), label="histograms"))
    dumped = schema.model_dump(mode="json")
    label = next(c for c in dumped["columns"] if c["name"] == "label")
    label["categories"] = [*label["categories"], "another-category"]
    other = CohortSchema.model_validate(dumped)
    assert other.schema_hash() != schema.schema_hash()
    with pytest.raises(EncoderError, match="another cohort schema"):
        TabularEncoder.from_json(encoder.to_json(), other)


@PROPERTY_SETTINGS
@given(st.data())
def test_hash_changes_when_a_histogram_changes(data: st.DataObject) -> None:
    schema = data.draw(schemas(), label="schema")
    histograms = data.draw(dp_histograms(schema), label="histograms")
    encoder = TabularEncoder.from_histograms(schema, histograms)
    spec = data.draw(st.sampled_from(schema.columns), label="column")
    cell = data.draw(st.integers(min_value=0, max_value=spec.n_cells() - 1), label="cell")
    counts = np.clip(histograms.get(spec.name, np.ones(spec.n_cells())), 0.0, None)
    total = counts.sum()
    if total <= 0:  # was uniform: put all mass in one cell
        changed_counts = np.zeros_like(counts)
        changed_counts[cell] = 1.0
    else:  # double the total by adding to one cell: another cell's (unfloored) share halves
        assume(np.delete(counts, cell).max(initial=0.0) > 2e-3 * total)
        changed_counts = counts.copy()
        changed_counts[cell] += total
    changed = {**histograms, spec.name: changed_counts}
    assert TabularEncoder.from_histograms(schema, changed).hash != encoder.hash


@PROPERTY_SETTINGS
@given(st.data())
def test_negative_counts_are_treated_as_zero(data: st.DataObject) -> None:
    schema = data.draw(schemas(), label="schema")
    histograms = data.draw(dp_histograms(schema), label="histograms")
    clipped = {k: np.clip(v, 0.0, None) for k, v in histograms.items()}
    assert (
        TabularEncoder.from_histograms(schema, histograms).hash
        == TabularEncoder.from_histograms(schema, clipped).hash
    )


@PROPERTY_SETTINGS
@given(st.data())
def test_categorical_marginals_are_probabilities(data: st.DataObject) -> None:
    schema = data.draw(schemas(), label="schema")
    histograms = data.draw(dp_histograms(schema), label="histograms")
    encoder = TabularEncoder.from_histograms(schema, histograms)
    blocks = encoder.categorical_blocks()
    assert [b.name for b in blocks] == [c.name for c in schema.columns if c.is_categorical]
    for block in blocks:
        p = encoder.marginal(block.name)
        assert p.shape == (block.width,)
        assert (p > 0).all()
        assert p.sum() == pytest.approx(1.0)
        counts = np.clip(histograms.get(block.name, np.ones(block.width)), 0.0, None)
        if counts.sum() > 0 and counts.min() > 1e-3 * counts.sum():  # no floor involved
            np.testing.assert_allclose(p, counts / counts.sum(), rtol=1e-9)


# ---------------------------------------------------------------- the shipped schema, real counts
@pytest.fixture(scope="module")
def shipped() -> tuple[CohortSchema, pd.DataFrame, TabularEncoder]:
    schema = load_schema()
    static = generate_demo_cohort(300, seed=5).static
    return schema, static, TabularEncoder.from_histograms(schema, histogram_counts(static, schema))


def test_demo_rows_round_trip_through_the_shipped_encoder(
    shipped: tuple[CohortSchema, pd.DataFrame, TabularEncoder],
) -> None:
    schema, static, encoder = shipped
    encoded = encoder.transform(static)
    n_categories = sum(len(c.categories or ()) for c in schema.columns if c.is_categorical)
    n_numeric = sum(1 for c in schema.columns if not c.is_categorical)
    assert encoder.width == n_categories + n_numeric == encoded.shape[1]
    back = encoder.inverse_transform(encoded)
    _assert_inside_schema(back, schema)
    for spec in schema.columns:
        if spec.is_categorical:
            pd.testing.assert_series_equal(back[spec.name], static[spec.name], check_dtype=False)
        elif spec.kind == "integer":
            np.testing.assert_array_equal(back[spec.name], static[spec.name])
        else:
            np.testing.assert_allclose(back[spec.name], static[spec.name], atol=1e-3)


def test_transform_ignores_extra_columns_and_order(
    shipped: tuple[CohortSchema, pd.DataFrame, TabularEncoder],
) -> None:
    _, static, encoder = shipped
    shuffled = static[list(reversed(static.columns))]  # includes patient_id
    np.testing.assert_array_equal(encoder.transform(shuffled), encoder.transform(static))


def test_transform_of_frame_lacking_a_column(
    shipped: tuple[CohortSchema, pd.DataFrame, TabularEncoder],
) -> None:
    _, static, encoder = shipped
    with pytest.raises(EncoderError, match="bmi"):
        encoder.transform(static.drop(columns=["bmi"]))


def test_transform_of_unknown_category(shipped: tuple[CohortSchema, pd.DataFrame, TabularEncoder]) -> None:
    _, static, encoder = shipped
    bad = static.copy()
    bad.loc[3, "gender"] = "alien"
    with pytest.raises(EncoderError, match="'gender' has values outside its categories"):
        encoder.transform(bad)


def test_histogram_with_wrong_number_of_cells(
    shipped: tuple[CohortSchema, pd.DataFrame, TabularEncoder],
) -> None:
    schema, static, _ = shipped
    histograms = histogram_counts(static, schema)
    histograms["gender"] = np.ones(5)
    with pytest.raises(EncoderError, match="'gender'"):
        TabularEncoder.from_histograms(schema, histograms)


def test_all_zero_histogram_gives_uniform_marginal() -> None:
    schema = load_schema()
    encoder = TabularEncoder.from_histograms(schema, {"gender": np.array([0.0, -3.0, 0.0])})
    np.testing.assert_allclose(encoder.marginal("gender"), [1 / 3] * 3)
    assert encoder.hash == TabularEncoder.from_histograms(schema, {}).hash


def test_from_json_rejects_bad_specs(shipped: tuple[CohortSchema, pd.DataFrame, TabularEncoder]) -> None:
    schema, _, encoder = shipped
    with pytest.raises(EncoderError, match="not valid JSON"):
        TabularEncoder.from_json("{not json", schema)
    spec = json.loads(encoder.to_json())
    with pytest.raises(EncoderError, match="version"):
        TabularEncoder.from_json(json.dumps({**spec, "version": 999}), schema)
    renamed = json.loads(encoder.to_json())
    renamed["columns"][0]["name"] = "renamed"
    with pytest.raises(EncoderError, match="columns"):
        TabularEncoder.from_json(json.dumps(renamed), schema)


def test_hash_is_sha256_hex(shipped: tuple[CohortSchema, pd.DataFrame, TabularEncoder]) -> None:
    _, _, encoder = shipped
    assert len(encoder.hash) == 64 and int(encoder.hash, 16) >= 0
    assert json.loads(encoder.to_json())["schema_hash"] == load_schema().schema_hash()


# ---------------------------------------------------------------- empty tail bins, integer bounds
def _one_column_schema(spec: ColumnSpec) -> CohortSchema:
    label = ColumnSpec(name="label", kind="categorical", categories=("a", "b"))
    return CohortSchema(id_column="pid", label_column="label", columns=(label, spec))


@pytest.mark.parametrize("n_values", [16, 200])
def test_integer_value_in_an_empty_tail_bin_round_trips(n_values: int) -> None:
    # Regression: the quantile clip once exceeded the floored mass of an empty bin once a
    # column had more than 10 cells, so 0 decoded as 1 here.
    spec = ColumnSpec(name="x", kind="integer", min=0, max=n_values - 1, bins=n_values)
    assert spec.n_cells() == n_values
    counts = np.zeros(n_values)
    counts[-2:] = 100.0  # DP noise left only the top values with mass
    encoder = TabularEncoder.from_histograms(_one_column_schema(spec), {"x": counts})
    values = [0, 1, n_values // 2, n_values - 3, n_values - 1]
    frame = pd.DataFrame({"label": ["a"] * len(values), "x": values})
    back = encoder.inverse_transform(encoder.transform(frame))
    assert back["x"].tolist() == values


def test_integer_column_with_fractional_bounds_is_refused() -> None:
    # Regression: with min=0.5, max=3.7 inverse_transform clipped before rounding and emitted
    # 0 and 4, outside the declared range.
    with pytest.raises(ValueError, match="whole-number min and max"):
        ColumnSpec(name="x", kind="integer", min=0.5, max=3.7)
    spec = ColumnSpec(name="x", kind="integer", min=1.0, max=3.0)  # whole floats are fine
    encoder = TabularEncoder.from_histograms(_one_column_schema(spec), {})
    matrix = np.array([[1.0, 0.0, -9.0], [0.0, 1.0, 9.0]], dtype=np.float32)
    assert encoder.inverse_transform(matrix)["x"].tolist() == [1, 3]
