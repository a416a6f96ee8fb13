"""The declared run plan: validated at load, stage overrides, budget shares, refused model names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.errors import ConfigError
from configs.settings import load_settings, parse_overrides
from models.registry import BUILTIN_MODELS
from server.plan import audit_budget_share, budget_shares, evaluation_budget_share, plan_releases

ROOT = Path(__file__).resolve().parents[2]
CTGAN = {"model": "dp-ctgan", "rounds": 2, "epsilon_share": 0.4}
TIMEGAN = {"model": "timegan", "phases": {"embedding": 1, "joint": 1}, "epsilon_share": 0.4}
HHG = {"model": "hhg", "phases": {"vae": 1, "diffusion": 1, "refine": 1}, "epsilon_share": 0.1}


def test_the_default_plan_is_todays_run() -> None:
    s = load_settings()
    assert [(st.model, st.rounds, st.phases, st.epsilon_share, st.strategy.name) for st in s.stages] == [
        ("pgm", 0, {}, 0.4, "fedavg"),
        ("timegan", 0, {"embedding": 6, "supervised": 2, "joint": 8}, 0.21, "fedavg"),
        ("hybrid-lstm", 4, {}, 0.05, "fedavg"),
        ("transformer", 4, {}, 0.05, "fedavg"),
    ]
    # At its first round a hospital spends this share of what it has left: the static generator
    # half of what the handshake left (0.4 of 0.8), TimeGAN 0.21 of 0.4, each risk model its 0.05
    # of what is left then, the audit 0.05 of 0.09 and the risk evaluation all that remains.
    assert budget_shares(s) == pytest.approx([0.5, 0.525, 0.05 / 0.19, 0.05 / 0.14])
    assert audit_budget_share(s) == pytest.approx(0.05 / 0.09)
    assert evaluation_budget_share(s) == pytest.approx(1.0)
    assert plan_releases(s) == ["sequence-moments"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"stages.0.model": "dp-ctgan", "stages.0.rounds": 3}, (3, 6)),
        ({"stages.pgm.model": "dp-ctgan", "stages.pgm.rounds": 4}, (4, 6)),
        ({"stages.timegan.phases.embedding": 2}, (0, 2)),
        (parse_overrides("stages.1.phases.embedding=5"), (0, 5)),
    ],
)
def test_stages_are_overridden_by_position_or_model(overrides: dict, expected: tuple[int, int]) -> None:
    s = load_settings(None, overrides)
    assert (s.stages[0].rounds, s.stages[1].phases["embedding"]) == expected
    assert s.stages[1].phases["joint"] == 8  # the rest of the stage is kept


def test_a_whole_plan_replaces_the_default() -> None:
    s = load_settings(None, {"stages": [CTGAN]})
    assert [st.model for st in s.stages] == ["dp-ctgan"]
    assert plan_releases(s) == ["numeric-moments"]


def test_a_refiner_may_follow_the_coarse_static_generator() -> None:
    s = load_settings(None, {"stages": [{"model": "pgm", "epsilon_share": 0.2}, HHG, TIMEGAN]})
    assert [st.model for st in s.stages] == ["pgm", "hhg", "timegan"]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{**CTGAN, "epsilon_share": 0.5}, {**TIMEGAN, "epsilon_share": 0.4}], "add up to 1.19 > 1"),
        ([{**CTGAN, "model": "no-such-model"}], "stages.0.model: unknown model 'no-such-model'; allowed:"),
        ([{**CTGAN, "strategy": {"name": "fedsgd"}}], "unknown strategy 'fedsgd'; choose one of: fedavg"),
        ([{**CTGAN, "strategy": {"name": "fedprox"}}], "proximal_mu"),
        ([CTGAN, {**TIMEGAN, "phases": {"warmup": 2}}], "unknown phase(s) ['warmup']"),
        ([CTGAN, {**TIMEGAN, "rounds": 3}], "a phased model takes `phases`"),
        ([{**CTGAN, "rounds": 0}], "rounds must be at least 1"),
        ([CTGAN, {**TIMEGAN, "epsilon_share": 0.0}], "epsilon_share must be above 0 for DP-SGD rounds"),
        ([{**CTGAN, "phases": {"joint": 1}}], "the model has no phases"),
        ([TIMEGAN], "needs one static generator stage (or a coarse one and its refiner), got []"),
        ([TIMEGAN, CTGAN], "stages.0 must be the static generator"),
        ([CTGAN, {**CTGAN, "model": "pgm", "rounds": 0}], "a second static stage must come right after"),
        ([{"model": "pgm"}, TIMEGAN, HHG], "a second static stage must come right after the first"),
        ([], "no [[stages]]"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_stage(stages: list, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"stages": stages})
    assert message in str(err.value)


def test_an_override_of_a_missing_stage_is_named() -> None:
    with pytest.raises(ConfigError, match=r"override 'stages.ctgan': no such entry .*'pgm', 'timegan'"):
        load_settings(None, {"stages.ctgan.rounds": 2})


def test_a_model_table_must_hold_parameters() -> None:
    with pytest.raises(ConfigError, match=r"model.dp-ctgan.embedding_dim"):
        load_settings(None, {"model.dp-ctgan.embedding_dim": -1})


def _settings_in_fresh_process(overrides: dict) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "from configs.settings import load_settings\n"
        "from configs.errors import ConfigError\n"
        "from models.registry import registered_models\n"
        "assert 'leaky-replay' not in registered_models(), registered_models()\n"
        f"try:\n    load_settings(None, {overrides!r})\n"
        "except ConfigError as err:\n    print(err)\n    sys.exit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MINDFED_MODEL_PLUGINS"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.generator": "leaky-replay"},
        {"stages.0.model": "leaky-replay"},
    ],
    ids=["old-key", "stage"],
)
def test_the_audit_control_cannot_be_chosen_by_a_run_config(overrides: dict) -> None:
    # A fresh process: the tests register `leaky-replay` for themselves, production never does.
    result = _settings_in_fresh_process(overrides)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "leaky-replay" in result.stdout
    assert "allowed" in result.stdout and all(f"'{name}'" in result.stdout for name in BUILTIN_MODELS)


def test_a_stage_is_left_out_with_false() -> None:
    s = load_settings(
        None,
        parse_overrides(
            "stages.timegan=false stages.hybrid-lstm=false stages.transformer=false "
            "stages.pgm.epsilon_share=0.7"
        ),
    )
    assert [(st.model, st.epsilon_share) for st in s.stages] == [("pgm", 0.7)]
    assert budget_shares(s) == pytest.approx([0.875])
    # what the plan leaves unspent stays unspent: the audit asks its own share only
    assert audit_budget_share(s) == pytest.approx(0.05 / 0.1)
