"""One `mindfed simulate` federation in a fresh subprocess: wall time, peak memory, round timings.

The parent writes the demo cohort's hospital folders; the child runs `simulation.runner.simulate`
on them (the federation of `mindfed simulate`, without its demo-only quality check against the
whole real cohort) while a thread samples the PSS of its process tree (Ray's GCS, raylet, actors).

    python -m benchmarks.federation SPEC_JSON OUT_DIR   # the child; the parent calls `run`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.procmem import TreePeak

REPO = Path(__file__).resolve().parent.parent
OUTCOME = "outcome.json"


@dataclass(frozen=True)
class Spec:
    """A federation: its name, hospitals, demo patients (all hospitals together) and overrides."""

    name: str
    hospitals: int
    patients: int
    overrides: dict[str, Any] = field(default_factory=dict)

    def settings_overrides(self) -> dict[str, Any]:
        """The dotted overrides `simulate` takes, hospitals and patients included."""
        return {
            **self.overrides,
            "federation.hospitals": self.hospitals,
            "federation.patients": self.patients,
        }


@dataclass
class Outcome:
    """What a run measured; `error` (and the log's tail) when it failed."""

    spec: Spec
    wall_s: float = 0.0
    peak_mib: float = 0.0  # PSS of the whole process tree, at its highest sample
    largest_mib: float = 0.0  # the largest single process (the driver or one Ray actor)
    processes: int = 0  # in the tree at the peak
    rounds: list[dict[str, Any]] = field(default_factory=list)  # metrics.json "rounds"
    timings: dict[str, Any] = field(default_factory=dict)  # metrics.json "timings"
    audit_passed: bool | None = None
    bundle: str = ""  # the exported generator's bundle folder
    log: str = ""
    error: str = ""

    def steady_rounds(self, stage: str | None = None) -> list[dict[str, Any]]:
        """Rounds after each model's first, of one stage or all (a model's first round also plans
        each hospital's noise, once for all its phases: `client.app._noise_plan`)."""
        models: set[str] = set()
        steady = []
        for row in self.rounds:
            model = row["stage"].split()[0]  # "timegan joint" -> "timegan"
            if model in models and (stage is None or row["stage"] == stage):
                steady.append(row)
            models.add(model)
        return steady


def run(spec: Spec, work: Path, *, timeout_s: float) -> Outcome:
    """Write the cohort folders, then run the federation in a child process; never raises."""
    from configs.settings import load_settings
    from simulation.runner import prepare_demo_cohort

    out = work / spec.name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    outcome = Outcome(spec, log=str(log))
    try:
        prepare_demo_cohort(load_settings(None, spec.settings_overrides()), out / "cohort")
        with log.open("w", encoding="utf-8") as sink:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.federation", json.dumps(asdict(spec)), str(out)],
                cwd=REPO,
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
    except subprocess.TimeoutExpired:
        outcome.error = f"did not finish within {timeout_s:.0f} s"
        return outcome
    except Exception as err:  # a failed run is a finding for the table
        outcome.error = f"{type(err).__name__}: {err}"
        return outcome
    if done.returncode != 0 or not (out / OUTCOME).is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        outcome.error = f"exit {done.returncode}: " + " / ".join(line[:160] for line in tail)
        return outcome
    measured = json.loads((out / OUTCOME).read_text(encoding="utf-8"))
    measured["spec"] = spec
    return Outcome(**measured)


def _child(spec: Spec, out: Path) -> None:
    """Run the federation on the folders under `out/cohort`, sampling memory; write outcome.json."""
    from simulation.runner import simulate

    with TreePeak() as peak:
        started = time.perf_counter()
        metrics = simulate(
            config=None,
            overrides=spec.settings_overrides(),
            out_dir=out / "run",
            cohort_dir=out / "cohort",
        ).metrics
        wall = time.perf_counter() - started
    release = out / "run" / metrics.get("release", {}).get("folder", "")
    outcome = {
        "wall_s": wall,
        "peak_mib": peak.total_mib,
        "largest_mib": peak.largest_mib,
        "processes": peak.processes,
        "rounds": metrics.get("rounds", []),
        "timings": metrics.get("timings", {}),
        "audit_passed": metrics.get("audit", {}).get("passed"),
        "bundle": str(release / "bundle"),
        "log": str(out / "run.log"),
    }
    (out / OUTCOME).write_text(json.dumps(outcome, indent=2), encoding="utf-8")


if __name__ == "__main__":
    _child(Spec(**json.loads(sys.argv[1])), Path(sys.argv[2]))
