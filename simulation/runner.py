"""Single-machine federation: demo cohort -> hospital folders -> Flower's simulation engine."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from configs.settings import RunSettings, RuntimeSettings, format_overrides, load_settings
from models.statistics import column_shape_vs_real, mean_score
from privacy.storage import atomic_write_text
from simulation.cohort import DemoCohort, write_cohort_folder
from simulation.partition import demo_partitions
from simulation.risk_check import risk_check

logger = logging.getLogger(__name__)

# Flower's telemetry would try the network at every run; hospitals' runs must not.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEMO_CHECK_SKIPPED = (
    "the cohort is the hospitals' own folders: only the generated demo cohort gives a whole real "
    "population and fresh patients to score the release against"
)


@dataclass(frozen=True)
class SimulationOutcome:
    out_dir: Path
    metrics: dict[str, Any]
    column_shape_vs_real: float | None  # demo cohort only


def prepare_demo_cohort(settings: RunSettings, cohort_dir: Path) -> DemoCohort:
    """Generate the embedded cohort and write one data-contract folder per hospital."""
    cohort, parts = demo_partitions(settings, settings.federation.hospitals)
    for index, part in enumerate(parts, start=1):
        write_cohort_folder(part, cohort_dir / f"hospital-{index}")
    return cohort


def client_resources(runtime: RuntimeSettings, hospitals: int, *, cpus: int, gpus: int) -> dict[str, float]:
    """Ray's resources per simulated client: its torch threads in CPUs, and a GPU share when one is
    visible and `runtime.device` is not "cpu" (0 GPU otherwise)."""
    # More CPUs than the machine has would leave every client unplaceable.
    num_cpus = max(1, min(runtime.threads_per_client, cpus))
    if gpus < 1 or runtime.device == "cpu":
        return {"num_cpus": float(num_cpus), "num_gpus": 0.0}
    # Clients that can run at once (the CPUs allow no more), spread evenly over the GPUs; the share
    # is rounded down to Ray's 1e-4 resource grain so that 1 / share whole clients fit on a GPU.
    concurrent = max(1, min(hospitals, cpus // num_cpus))
    per_gpu = math.ceil(concurrent / gpus)
    return {"num_cpus": float(num_cpus), "num_gpus": math.floor(1e4 / per_gpu) / 1e4}


def _machine_resources() -> tuple[int, int]:
    """(CPUs this process may use, CUDA GPUs visible to torch)."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpus, torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_flower_simulation(settings: RunSettings, run_config: dict[str, Any]) -> None:
    """Flower's simulation engine (Ray backend) running our ServerApp and ClientApp."""
    # Flower's public `run_simulation` takes no run config; this is the call its own
    # `flwr-simulation` process makes, with the app folder so clients get the same config.
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=secrets.randbits(63))
    run.override_config = run_config
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id  # as Flower's own legacy entry does
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    fused = get_fused_config_from_dir(PROJECT_DIR, run_config)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    cpus, gpus = _machine_resources()
    resources = client_resources(settings.runtime, settings.federation.hospitals, cpus=cpus, gpus=gpus)
    logger.info("simulated clients get %s (%d CPUs, %d GPUs visible)", resources, cpus, gpus)
    _run_simulation(
        num_supernodes=settings.federation.hospitals,
        client_app_attr="client.app:app",
        server_app_attr="server.app:app",
        is_app=True,
        backend_config={
            "client_resources": resources,
            "init_args": {"logging_level": "ERROR", "log_to_driver": True},
        },
        app_dir=str(PROJECT_DIR),
        run=run,
        server_app_context=context,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
    )


def _sequence_check(
    demo: DemoCohort, synthetic: pd.DataFrame, weeks: pd.DataFrame, settings: RunSettings
) -> dict[str, float]:
    """TimeGAN fidelity metrics of the released weeks against the whole demo cohort."""
    from models.sequence.encoder import SequenceEncoder
    from models.sequence_metrics import evaluate_sequences, link_pairs

    schema = settings.load_schema()
    encoder = SequenceEncoder.from_schema(schema)
    real = encoder.transform(demo.timeseries, demo.static[schema.id_column])
    fake = encoder.transform(weeks, synthetic[schema.id_column])
    pairs = link_pairs(schema)
    return evaluate_sequences(
        real,
        fake,
        channels=encoder.channels,
        seed=settings.federation.seed,
        real_static=demo.static if pairs else None,  # a schema without numeric columns has no links
        syn_static=synthetic if pairs else None,
        pairs=pairs,
    )


def _test_seed(settings: RunSettings) -> int:
    """The fresh demo patients' seed: another than the cohort's (the same would redraw its rows)."""
    from simulation.evaluation import TEST_SEED

    return TEST_SEED if settings.federation.seed != TEST_SEED else TEST_SEED + 1


def _utility_check(
    demo: DemoCohort, test: DemoCohort, synthetic: pd.DataFrame, settings: RunSettings
) -> dict[str, Any]:
    """SDMetrics quality (column shapes, pair trends) against the whole demo cohort, and a label
    classifier trained on the synthetic table, tested on fresh demo patients."""
    from simulation.evaluation import quality_report, train_synthetic_test_real

    schema = settings.load_schema()
    fed_seed = settings.federation.seed
    return {
        "quality": quality_report(demo.static, synthetic, schema),
        "train_synthetic_test_real": {
            **train_synthetic_test_real(synthetic, demo.static, test.static, schema, seed=fed_seed),
            "test_seed": _test_seed(settings),
        },
    }


def _demo_check(
    demo: DemoCohort, metrics: dict[str, Any], settings: Any, out_dir: Path, cohort_dir: Path
) -> dict[str, Any]:
    """The release scored against the whole demo cohort and fresh demo patients. Only the
    simulation holds them: never something a deployed server could compute."""
    from simulation.cohort import generate_demo_cohort
    from simulation.evaluation import TEST_PATIENTS

    release_dir = out_dir / metrics.get("release", {}).get("folder", "")
    synthetic = pd.read_csv(release_dir / "synthetic" / "static.csv")
    per_column = column_shape_vs_real(synthetic, demo.static, settings.load_schema())
    test = generate_demo_cohort(TEST_PATIENTS, seed=_test_seed(settings))
    check = {
        "column_shape_vs_real": mean_score(per_column),
        "per_column": per_column,
        **_utility_check(demo, test, synthetic, settings),
        "risk": risk_check(demo, test, release_dir, metrics, settings.federation.seed, cohort_dir=cohort_dir),
    }
    weeks_path = release_dir / "synthetic" / "timeseries.csv"
    if weeks_path.is_file():
        check["sequence"] = _sequence_check(demo, synthetic, pd.read_csv(weeks_path), settings)
    return check


def simulate(
    *,
    config: Path | None,
    overrides: dict[str, Any],
    out_dir: Path,
    cohort_dir: Path | None = None,
    resume: bool = False,
) -> SimulationOutcome:
    """Run a federation on one machine: the embedded demo cohort, or your own hospital folders.

    With `cohort_dir`, each sub-folder is one hospital's data-contract folder and the number of
    hospitals is the number of sub-folders; without it the demo cohort is generated. With
    `resume`, the run in `out_dir` goes on after its last checkpointed round (same settings).
    """
    from client.node import hospital_folders

    out_dir = Path(out_dir).resolve()
    demo: DemoCohort | None = None
    if cohort_dir is not None:
        cohort_dir = Path(cohort_dir).resolve()
        overrides = {**overrides, "federation.hospitals": len(hospital_folders(cohort_dir))}
    settings = load_settings(config, overrides)
    if resume:  # refuse here, with the reason, before anything is written
        from server.checkpoint import resumable_checkpoint

        resumable_checkpoint(out_dir, settings)
    if cohort_dir is None:
        cohort_dir = out_dir / "cohort"
        demo = prepare_demo_cohort(settings, cohort_dir)
    run_config = {
        "config-file": str(Path(config).resolve()) if config else "",
        "overrides": format_overrides(overrides),
        "cohort-dir": str(cohort_dir),
        "out-dir": str(out_dir),
        "resume": resume,
    }
    started = time.time()
    _run_flower_simulation(settings, run_config)
    metrics_path = out_dir / "metrics.json"
    # A metrics.json older than this run is an earlier run's: this one failed before its export.
    if not metrics_path.is_file() or metrics_path.stat().st_mtime < started - 1:
        raise RuntimeError(
            f"the federation finished without writing {metrics_path}; see the log above"
            + (
                " (its last completed round is checkpointed: rerun with --resume)"
                if (out_dir / "checkpoint" / "checkpoint.json").is_file()
                else ""
            )
        )
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    score = None
    if demo is None:
        # Hospitals' own folders (any schema): no whole population or fresh patients to score against.
        metrics["demo_check"] = {"skipped": DEMO_CHECK_SKIPPED}
    else:
        metrics["demo_check"] = _demo_check(demo, metrics, settings, out_dir, cohort_dir)
        score = metrics["demo_check"]["column_shape_vs_real"]
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2, default=str))
    return SimulationOutcome(out_dir, metrics, score)
