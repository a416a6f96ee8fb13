"""Tests for configs.settings: defaults, user files, dotted overrides and the Flower run config."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from configs.errors import ConfigError
from configs.schema import DEFAULT_SCHEMA_PATH, load_schema
from configs.settings import (
    DEFAULT_SETTINGS_PATH,
    RunSettings,
    format_overrides,
    load_settings,
    parse_overrides,
    settings_from_dict,
    settings_from_run_config,
)

PROJECT_DIR = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str, name: str = "user.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _pyproject_run_config() -> dict[str, Any]:
    """The `[tool.flwr.app.config]` table exactly as `flwr run .` sees it."""
    with (PROJECT_DIR / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def _problem_lines(err: Exception) -> list[str]:
    return [line.strip() for line in str(err).splitlines()[1:]]


# ---------------------------------------------------------------- defaults
def test_defaults_match_demo_toml() -> None:
    s = load_settings()
    assert s.federation.hospitals == 3
    assert s.federation.patients == 4000
    assert s.federation.partition == "non-iid"
    assert s.federation.dirichlet_alpha == 1.0
    assert (s.stages[0].model, s.stages[0].rounds) == ("pgm", 0)
    assert s.federation.local_epochs == 1
    assert s.federation.batch_size == 64
    assert s.federation.seed == 7
    assert s.federation.round_timeout_s == 600.0
    assert s.federation.min_replies == 1
    assert s.privacy.max_epsilon == 5.0
    assert s.privacy.delta == 1e-5
    assert s.privacy.clipping_norm == 1.0
    assert s.privacy.statistics_epsilon_share == 0.2
    assert [stage.model for stage in s.stages] == ["pgm", "timegan", "hybrid-lstm", "transformer"]
    assert s.risk.synthetic_models == ["hybrid-lstm", "transformer", "gbm"]
    params = s.model.params_for("dp-ctgan")
    assert params["embedding_dim"] == 64
    assert params["generator_dims"] == [128, 128]
    assert params["generator_lr"] == 2e-4
    assert s.model.params_for("no-such-model") == {}
    assert s.runtime.device == "auto"
    assert s.runtime.threads_per_client == 1
    assert s.export.synthetic_rows == 10000
    assert s.export.round_sample_rows == 2000


def test_default_schema_path_resolves_next_to_demo_toml() -> None:
    s = load_settings()
    assert s.schema_path == DEFAULT_SETTINGS_PATH.parent / "cohort.toml"
    assert s.load_schema() == load_schema(DEFAULT_SCHEMA_PATH)


def test_passing_the_demo_file_itself_equals_the_defaults() -> None:
    assert load_settings(DEFAULT_SETTINGS_PATH) == load_settings()


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.federation.local_epochs = 3  # type: ignore[misc]


def test_to_toml_dict_round_trips() -> None:
    s = load_settings(None, {"federation.local_epochs": 2, "model.dp-ctgan.embedding_dim": 16})
    again = settings_from_dict(s.to_toml_dict(), source="round-trip", base_dir=Path("/nonexistent"))
    assert again == s
    assert again.model.params_for("dp-ctgan")["embedding_dim"] == 16


# ---------------------------------------------------------------- parse_overrides
def test_parse_overrides_reads_toml_literals() -> None:
    assert parse_overrides("federation.local_epochs=3 privacy.max_epsilon=4.0") == {
        "federation.local_epochs": 3,
        "privacy.max_epsilon": 4.0,
    }
    parsed = parse_overrides(
        'a.int=-2 a.float=1.0e-5 a.bool=true a.str="x y" a.bare=word a.list="[1, 2]" a.q=\'[3]\''
    )
    assert parsed == {
        "a.int": -2,
        "a.float": 1e-5,
        "a.bool": True,
        "a.str": "x y",
        "a.bare": "word",
        "a.list": [1, 2],
        "a.q": [3],
    }
    assert isinstance(parsed["a.int"], int) and isinstance(parsed["a.float"], float)


def test_parse_overrides_of_empty_text_is_empty() -> None:
    assert parse_overrides("") == {}
    assert parse_overrides("   ") == {}


@pytest.mark.parametrize("text", ["federation.local_epochs", "=3", "federation.local_epochs=3 oops"])
def test_parse_overrides_rejects_items_without_key_and_value(text: str) -> None:
    with pytest.raises(ConfigError, match=r"is not of the form section\.key=value"):
        parse_overrides(text)


def test_overrides_are_applied_over_the_defaults() -> None:
    s = load_settings(None, parse_overrides("federation.local_epochs=3 privacy.max_epsilon=4.0"))
    assert s.federation.local_epochs == 3
    assert s.privacy.max_epsilon == 4.0
    defaults = load_settings()
    assert s.federation.hospitals == defaults.federation.hospitals
    assert s.privacy.delta == defaults.privacy.delta
    assert s.model == defaults.model


def test_model_param_override_is_applied() -> None:
    s = load_settings(
        None, parse_overrides("model.dp-ctgan.generator_lr=1.0e-3 model.dp-ctgan.embedding_dim=8")
    )
    params = s.model.params_for("dp-ctgan")
    assert params["generator_lr"] == 1e-3
    assert params["embedding_dim"] == 8
    assert params["discriminator_dims"] == [128, 128]  # untouched keys keep their defaults


def test_override_into_a_scalar_is_rejected() -> None:
    with pytest.raises(
        ConfigError, match=r"override 'federation\.local_epochs\.x': 'local_epochs' is not a table"
    ):
        load_settings(None, {"federation.local_epochs": 3, "federation.local_epochs.x": 1})


WRONG_OVERRIDES = [
    ("federation.local_epochs=0", "federation.local_epochs"),
    ("federation.hospitals=0", "federation.hospitals"),
    ("federation.batch_size=1", "federation.batch_size"),
    ("federation.dirichlet_alpha=0", "federation.dirichlet_alpha"),
    ("privacy.delta=2", "privacy.delta"),
    ("privacy.max_epsilon=0", "privacy.max_epsilon"),
    ("privacy.statistics_epsilon_share=1.0", "privacy.statistics_epsilon_share"),
    ('federation.partition="weird"', "federation.partition"),
    ("federation.partition=weird", "federation.partition"),
    ("federation.local_epochs=three", "federation.local_epochs"),
    ("federation.bogus=1", "federation.bogus"),
    ("bogus.key=1", "bogus"),
    ("runtime.device=tpu", "runtime.device"),
    ("export.round_sample_rows=5", "export.round_sample_rows"),
    ("model.generator=bogus", "model.generator"),
    ("model.dp-ctgan.generator_lr=-1", "model.dp-ctgan.generator_lr"),
    ("model.dp-ctgan.embedding_dim=1", "model.dp-ctgan.embedding_dim"),
    ("model.dp-ctgan.bogus=1", "model.dp-ctgan.bogus"),
]


@pytest.mark.parametrize(("text", "key"), WRONG_OVERRIDES, ids=[t for t, _ in WRONG_OVERRIDES])
def test_wrong_override_names_the_dotted_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, parse_overrides(text))
    message = str(info.value)
    assert key in message, message
    assert str(DEFAULT_SETTINGS_PATH) in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("federation.local_epochs=0", "federation.local_epochs"),
        ("privacy.delta=2", "privacy.delta"),
        ("federation.partition=weird", "federation.partition"),
    ],
)
def test_wrong_override_problem_line_starts_with_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, parse_overrides(text))
    assert any(line.startswith(f"{key}:") for line in _problem_lines(info.value)), str(info.value)


# ---------------------------------------------------------------- user TOML files
def test_user_file_is_laid_over_the_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "[federation]\nlocal_epochs = 2\n\n[privacy]\nmax_epsilon = 3.0\n")
    s = load_settings(path)
    assert s.federation.local_epochs == 2
    assert s.privacy.max_epsilon == 3.0
    assert s.federation.hospitals == 3
    assert s.privacy.delta == 1e-5
    assert s.schema_path == DEFAULT_SCHEMA_PATH  # no `schema` key: the packaged schema


def test_overrides_win_over_the_user_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[federation]\nlocal_epochs = 2\n")
    assert load_settings(path, {"federation.local_epochs": 5}).federation.local_epochs == 5


def test_user_schema_path_is_relative_to_the_user_file(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "my-cohort.toml").write_text(
        DEFAULT_SCHEMA_PATH.read_text(encoding="utf-8"), encoding="utf-8"
    )
    path = _write(tmp_path / "site", 'schema = "my-cohort.toml"\n')
    s = load_settings(path)
    assert s.schema_path.resolve() == (tmp_path / "site" / "my-cohort.toml").resolve()
    assert s.load_schema().schema_hash() == load_schema().schema_hash()


def test_unknown_top_level_key_in_user_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[federaton]\nlocal_epochs = 2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert "federaton" in message
    assert "federation" in message  # the allowed keys are listed


def test_unknown_nested_key_in_user_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[federation]\nroundz = 2\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert any(line.startswith("federation.roundz:") for line in _problem_lines(info.value))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("[federation]\nlocal_epochs = 0\n", "federation.local_epochs", id="rounds"),
        pytest.param("[privacy]\ndelta = 2\n", "privacy.delta", id="delta"),
        pytest.param('[federation]\npartition = "weird"\n', "federation.partition", id="partition"),
        pytest.param(
            "[model.dp-ctgan]\ngenerator_lr = -1\n", "model.dp-ctgan.generator_lr", id="model-param"
        ),
        pytest.param("[model.dp-ctgan]\nbogus = 1\n", "model.dp-ctgan.bogus", id="unknown-model-param"),
        pytest.param(
            '[model]\ngenerator = "bogus"\n',
            "model.generator",
            id="unknown-model",
        ),
    ],
)
def test_wrong_value_in_user_file_names_file_and_dotted_key(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message, message


def test_unknown_model_lists_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.generator = 'bogus'.*allowed models: \['dp-ctgan'"):
        load_settings(_write(tmp_path, '[model]\ngenerator = "bogus"\n'))
    stage = '[[stages]]\nmodel = "bogus"\nrounds = 1\n'
    with pytest.raises(ConfigError, match=r"stages.0.model: unknown model 'bogus'; allowed: \['dp-ctgan'"):
        load_settings(_write(tmp_path, stage))


def test_non_utf8_user_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[federation]\n# r\xe9glages\nlocal_epochs = 2\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_broken_toml_user_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[federation\nlocal_epochs = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_missing_user_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_settings(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- Flower run config
def test_pyproject_run_config_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    run_config = _pyproject_run_config()
    assert set(run_config) >= {"config-file", "overrides"}
    monkeypatch.chdir(PROJECT_DIR)
    assert settings_from_run_config(run_config) == load_settings()
    assert settings_from_run_config(run_config, app_dir=PROJECT_DIR) == load_settings()


def test_run_config_found_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # configs/demo.toml is not here: falls back to the package's
    assert settings_from_run_config(_pyproject_run_config()) == load_settings()
    assert settings_from_run_config(_pyproject_run_config(), app_dir=tmp_path) == load_settings()


def test_run_config_overrides_are_applied() -> None:
    run_config = {**_pyproject_run_config(), "overrides": "federation.local_epochs=3 privacy.max_epsilon=4.0"}
    s = settings_from_run_config(run_config, app_dir=PROJECT_DIR)
    assert s.federation.local_epochs == 3
    assert s.privacy.max_epsilon == 4.0


def test_run_config_with_empty_config_file_uses_defaults() -> None:
    assert settings_from_run_config({"config-file": "", "overrides": ""}) == load_settings()
    assert settings_from_run_config({}) == load_settings()


def test_run_config_with_a_user_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[federation]\nhospitals = 5\n")
    s = settings_from_run_config({"config-file": "user.toml", "overrides": ""}, app_dir=tmp_path)
    assert s.federation.hospitals == 5
    s = settings_from_run_config({"config-file": str(path), "overrides": "federation.local_epochs=1"})
    assert (s.federation.hospitals, s.federation.local_epochs) == (5, 1)


def test_run_config_with_a_wrong_override_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        settings_from_run_config({**_pyproject_run_config(), "overrides": "privacy.delta=2"}, PROJECT_DIR)


def test_run_config_with_a_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        settings_from_run_config({"config-file": "absent.toml"}, app_dir=tmp_path)


# ---------------------------------------------------------------- format_overrides round trip
def test_format_overrides_round_trips_cli_values() -> None:
    dotted = {
        "federation.hospitals": 4,
        "federation.local_epochs": 3,
        "federation.seed": 0,
        "privacy.max_epsilon": 4.0,
        "privacy.delta": 1e-5,
        "federation.partition": "iid",
        "runtime.device": "cpu",
        "some.flag": False,
        "some.text": 'it\'s a "quoted" \\ path with spaces',
        "some.negative": -2.5,
    }
    text = format_overrides(dotted)
    assert parse_overrides(text) == dotted
    # and the result is accepted where it matters
    s = load_settings(None, parse_overrides(format_overrides({"federation.partition": "iid"})))
    assert s.federation.partition == "iid"


def test_format_overrides_of_nothing_is_empty() -> None:
    assert format_overrides({}) == ""


_KEYS = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=8),
    min_size=1,
    max_size=3,
).map(".".join)
# Any text; surrogates cannot be encoded at all.
_STRINGS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x7f"), max_size=20)
_VALUES = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _STRINGS,
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_format_then_parse_overrides_is_identity(dotted: dict[str, Any]) -> None:
    parsed = parse_overrides(format_overrides(dotted))
    assert parsed == dotted
    assert {k: type(v) for k, v in parsed.items()} == {k: type(v) for k, v in dotted.items()}


def test_format_overrides_round_trips_strings_with_control_characters() -> None:
    dotted = {"export.note": "line one\nline two", "export.tab": "a\x01b\tc", "export.quote": "'\"\\"}
    assert parse_overrides(format_overrides(dotted)) == dotted


def test_format_overrides_round_trips_a_string_with_del() -> None:
    dotted = {"export.note": "a\x7fb"}
    assert parse_overrides(format_overrides(dotted)) == dotted


def test_format_overrides_round_trips_infinite_floats() -> None:
    dotted = {"privacy.max_epsilon": float("inf"), "a.b": float("-inf")}
    assert parse_overrides(format_overrides(dotted)) == dotted


def test_run_settings_validates_directly() -> None:
    data = load_settings().to_toml_dict()
    data["federation"]["local_epochs"] = 0
    with pytest.raises(ValidationError):
        RunSettings.model_validate(data)
