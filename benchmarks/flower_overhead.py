"""Issue item 2: Flower's share of a round at demo size: round wall time over the hospitals' compute.

Demo size: configs/demo.toml's federation (3 hospitals, 4,000 patients, Ray actors of
`threads_per_client` CPUs). Its plan (pgm, TimeGAN, the two risk models; the server's
synthetic-route risk models off), and dp-ctgan and pgm + hhg as the static stage, each a run.
From metrics.json's rounds: the reference of a round is the server's own step plus the
hospitals' local training (`train-seconds`, reported to 0.1 s) as Ray can run it: on `slots`
actors at once (CPUs / CPUs per client), longest first. The rest is Flower: messages,
serialisation, Ray dispatch, waiting. A stage's first round is apart: each hospital also plans
its noise there (a privacy-accountant search, timed here beside it), outside `train-seconds`.
"""

from __future__ import annotations

import heapq
import os
import time
from pathlib import Path
from typing import Any

from benchmarks import scaling
from benchmarks.federation import Outcome, Spec
from benchmarks.results import Row

SECTION = "2 Flower overhead"
GOAL_SHARE = 0.10  # of a round
STATIC_SHARE = 0.75
ROUNDS = 4


def specs(quick: bool, tiny: dict[str, Any]) -> dict[str, Spec]:
    """The demo-size runs by role: the demo plan (full only), dp-ctgan, and pgm + hhg. Quick: small
    nets over 1,000 patients, and dp-ctgan's run is the scaling section's 3-hospital one."""
    hhg = {
        "stages": [
            {"model": "pgm", "epsilon_share": STATIC_SHARE - 0.1},
            {"model": "hhg", "phases": {"vae": 2, "diffusion": 2, "refine": 2}, "epsilon_share": 0.1},
        ],
        "risk.synthetic_models": [],
        **({f"model.hhg.{k}": v for k, v in tiny.get("hhg", {}).items()} if quick else {}),
    }
    if quick:
        return {"dp-ctgan": scaling.specs(True)[0], "pgm + hhg": Spec("demo-pgm-hhg", 3, 1000, hhg)}
    dp_ctgan = {
        "stages": [{"model": "dp-ctgan", "rounds": ROUNDS, "epsilon_share": STATIC_SHARE}],
        "risk.synthetic_models": [],
    }
    return {
        "demo plan": Spec("demo-plan", 3, 4000, {"risk.synthetic_models": []}),
        "dp-ctgan": Spec("demo-dp-ctgan", 3, 4000, dp_ctgan),
        "pgm + hhg": Spec("demo-pgm-hhg", 3, 4000, hhg),
    }


def slots(hospitals: int) -> int:
    """Hospitals Ray runs at once: CPUs over each client's CPUs (`simulation.runner.client_resources`)."""
    from configs.settings import load_settings
    from simulation.runner import client_resources

    cpus = len(os.sched_getaffinity(0))
    per_client = client_resources(load_settings().runtime, hospitals, cpus=cpus, gpus=0)["num_cpus"]
    return max(1, min(hospitals, int(cpus // per_client)))


def makespan(seconds: list[float], n_slots: int) -> float:
    """Finish time of these jobs on `n_slots` workers, longest first to the least loaded."""
    loads = [0.0] * max(1, n_slots)  # a heap: the least loaded worker first
    for s in sorted(seconds, reverse=True):
        heapq.heapreplace(loads, loads[0] + s)
    return max(loads)


def compute_seconds(row: dict[str, Any], n_slots: int) -> float:
    """A round's server step plus its hospitals' training as scheduled on the actors."""
    return float(row["server_seconds"]) + makespan(list(row["hospital_train_seconds"].values()), n_slots)


def noise_planning_s(*, rows: int, batch_size: int, rounds: int, epsilon: float) -> float:
    """Seconds one hospital takes to plan a stage's noise multiplier (done at its first round)."""
    from privacy import ledger as ledgers
    from privacy.facade import planned_steps
    from privacy.ledger import PrivacyLedger

    ledgers._rdp_per_step.cache_clear()  # cold, as at a hospital (its own sample rate: no cache hits)
    ledger = PrivacyLedger(max_epsilon=5.0, delta=1e-5)
    sample_rate, per_epoch = planned_steps(rows, batch_size)
    started = time.perf_counter()
    ledger.calibrate_noise_multiplier(
        target_epsilon=epsilon, sample_rate=sample_rate, steps=rounds * per_epoch
    )
    return time.perf_counter() - started


def cohort_read_s(run: Outcome) -> float:
    """Seconds the ClientApp takes, every call, to read, validate and split one hospital's folder."""
    from client.data import load_cohort, split_holdout
    from configs.settings import load_settings

    schema = load_settings(None, run.spec.settings_overrides()).load_schema()
    folder = Path(run.log).parent / "cohort" / "hospital-1"
    times = []
    for _ in range(3):
        started = time.perf_counter()
        cohort = load_cohort(folder, schema)
        split_holdout(cohort, share=0.2, id_column=schema.id_column, salt=b"benchmark-salt!!")
        times.append(time.perf_counter() - started)
    return sorted(times)[1]


def _stage_row(run: Outcome, stage: str, rounds: list[dict[str, Any]], n_slots: int, read_s: float) -> Row:
    wall = sum(float(r["seconds"]) for r in rounds)
    compute = sum(compute_seconds(r, n_slots) for r in rounds)
    share = 1 - compute / wall if wall else 0.0
    slowest_only = sum(float(r["framework_seconds"]) for r in rounds) / wall if wall else 0.0
    met = share <= GOAL_SHARE
    note = (
        f"rounds after the first: {len(rounds)}; Flower {share:.0%} of a round "
        f"({(wall - compute) / len(rounds):.2f} s/round); metrics.json framework_share {slowest_only:.0%} "
        f"(also counts waiting for a free actor)"
    )
    if not met:
        note += (
            f"; misses by {share - GOAL_SHARE:.0%} points: a fixed ~{(wall - compute) / len(rounds):.2f} s "
            f"per round beside {compute / len(rounds):.2f} s of compute (local rounds are short at demo "
            f"size); in it, MindFed's ClientApp re-reads its cohort every call ({read_s:.2f} s a call)"
        )
    return Row(
        section=SECTION,
        name=f"{run.spec.name}: {stage} round wall",
        value=wall,
        reference=compute,
        unit="s",
        reference_name=f"server step + hospitals' training on {n_slots} actors",
        goal=f"ratio <= {1 / (1 - GOAL_SHARE):.2f} (Flower <= {GOAL_SHARE:.0%})",
        met=met,
        note=note,
        detail={"rounds": rounds, "flower_share": share, "metrics_framework_share": slowest_only},
    )


def measure(runs: list[Outcome], *, batch_size: int) -> list[Row]:
    """Per stage of each demo-size run: steady rounds' wall beside their compute; first rounds apart."""
    rows: list[Row] = []
    steady_all: list[dict[str, Any]] = []
    for run in runs:
        if run.error:
            rows.append(
                Row(SECTION, f"{run.spec.name}", None, None, "s", "compute", note=f"failed: {run.error}")
            )
            continue
        n_slots, read_s = slots(run.spec.hospitals), cohort_read_s(run)
        for stage in dict.fromkeys(r["stage"] for r in run.rounds):
            steady = run.steady_rounds(stage)
            if steady:
                rows.append(_stage_row(run, stage, steady, n_slots, read_s))
                steady_all += steady
        rows.append(_first_rounds_row(run, n_slots, batch_size))
    if len(runs) > 1 and steady_all:
        first = runs[0]
        total = _stage_row(
            first, "every stage", steady_all, slots(first.spec.hospitals), cohort_read_s(first)
        )
        total.name = "all demo-size runs: every steady round"
        rows.insert(0, total)
    return rows


def _first_rounds_row(run: Outcome, n_slots: int, batch_size: int) -> Row:
    firsts = [r for r in run.rounds if r not in run.steady_rounds()]
    extra = sum(float(r["seconds"]) - compute_seconds(r, n_slots) for r in firsts)
    rows_each = int(run.spec.patients / run.spec.hospitals * 0.8)  # the audit holds 20% out
    plan_s = noise_planning_s(rows=rows_each, batch_size=batch_size, rounds=ROUNDS, epsilon=3.75)
    expected = plan_s * len(firsts) * run.spec.hospitals / n_slots
    return Row(
        section=SECTION,
        name=f"{run.spec.name}: first rounds beyond compute ({len(firsts)} models)",
        value=extra,
        reference=expected,
        unit="s",
        reference_name=f"noise planning ({plan_s:.2f} s/hospital) x hospitals / {n_slots} actors x models",
        note="a model's first round at each hospital also plans its noise (an RDP search, timed here for a "
        f"demo hospital's {rows_each} rows, {ROUNDS} rounds), outside train-seconds; also the actors' first "
        "imports of the model code",
    )
