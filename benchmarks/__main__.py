"""`python -m benchmarks [--quick] [--only NAME ...]`: the issue's performance figures, each a ratio
measured side by side in the same run, into benchmarks/results.json and benchmarks/results.md.

Sections (--only): dp-step (item 1), flower (2), scaling (3), sampling (4), memory (5). The full
run takes about 15 minutes on 2 cores (the federations dominate); --quick shrinks
every size for a smoke run of a few minutes and writes results-quick.{json,md} instead (--only:
results-partial.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from benchmarks import dp_step, flower_overhead, memory, results, sampling, scaling
from benchmarks.federation import Outcome, Spec, run

SECTIONS = ("dp-step", "memory", "flower", "scaling", "sampling")
RUN_TIMEOUT_S = 1800.0
console = Console(stderr=True)


class Runs:
    """Each federation run once per benchmark, shared by the sections that read it."""

    def __init__(self, work: Path, progress: Progress) -> None:
        self.work, self.progress = work, progress
        self.done: dict[str, Outcome] = {}

    def get(self, spec: Spec) -> Outcome:
        """The run's outcome, running it (in a child process) the first time a run like it is asked for."""
        key = json.dumps([spec.hospitals, spec.patients, spec.overrides], sort_keys=True)
        if key not in self.done:
            task = self.progress.add_task(f"federation {spec.name} ({spec.hospitals} hospitals)", total=None)
            self.done[key] = outcome = run(spec, self.work, timeout_s=RUN_TIMEOUT_S)
            self.progress.update(task, total=1, completed=1)
            said = f"failed: {outcome.error}" if outcome.error else f"{outcome.wall_s:.0f} s"
            console.log(f"federation {spec.name}: {said} (log: {outcome.log})")
        return self.done[key]


def _tiny() -> dict[str, dict[str, Any]]:
    from tests.support.round_models import tiny_params

    def listed(params: dict[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}

    return {name: listed(tiny_params(name)) for name in ("dp-ctgan", "hhg")}


def _section(progress: Progress, name: str, total: int | None) -> Callable[[str], None]:
    task = progress.add_task(name, total=total)

    def advance(what: str) -> None:
        progress.update(task, advance=1, description=f"{name}: {what}")

    return advance


def _bundles(demo: dict[str, Outcome], work: Path) -> dict[str, Path]:
    """Static bundles by label (pgm's without its linked TimeGAN), then the demo release with weeks."""
    bundles = {
        label: Path(run.bundle) for label, run in demo.items() if label != "demo plan" and not run.error
    }
    plan = demo.get("demo plan")
    if plan is not None and not plan.error:
        static = sampling.static_only(Path(plan.bundle), work / "pgm-static-bundle")
        bundles = {"pgm": static, **bundles, "demo release + weeks": Path(plan.bundle)}
    return bundles


def measure(
    args: argparse.Namespace, work: Path, progress: Progress, load: dict[str, Any]
) -> list[results.Row]:
    """Every chosen section's rows, in the table's order."""
    from configs.settings import load_settings

    rows: list[results.Row] = []
    batch_size = load_settings().federation.batch_size
    runs = Runs(work, progress)
    wanted = set(args.only or SECTIONS)
    if "dp-step" in wanted:
        rows += dp_step.measure(args.quick, _section(progress, "DP step", dp_step.jobs_count()))
        load["after dp-step"] = os.getloadavg()
    if "memory" in wanted:
        models = dp_step.round_models()
        rows += memory.measure(args.quick, models, _section(progress, "memory", len(models)))
        load["after memory"] = os.getloadavg()
    demo: dict[str, Outcome] = {}
    if wanted & {"flower", "sampling"}:
        demo = {role: runs.get(s) for role, s in flower_overhead.specs(args.quick, _tiny()).items()}
    if "flower" in wanted:
        rows += flower_overhead.measure(list(demo.values()), batch_size=batch_size)
        load["after flower"] = os.getloadavg()
    if "scaling" in wanted:
        rows += scaling.measure([runs.get(s) for s in scaling.specs(args.quick)])
        load["after scaling"] = os.getloadavg()
    if "sampling" in wanted:
        bundles = _bundles(demo, work)
        rows += sampling.measure(bundles, args.quick, _section(progress, "sampling", len(bundles) + 1))
        load["after sampling"] = os.getloadavg()
    order = {name: i for i, name in enumerate(("1", "2", "3", "4", "5"))}
    return sorted(rows, key=lambda r: order.get(r.section[:1], 9))


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, write the JSON and markdown, print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="these sections only")
    parser.add_argument("--keep", type=Path, help="keep the federations' folders and logs here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "machine": results.machine(),
        "command": "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "sections": args.only or list(SECTIONS),
        "load_average": {},
    }
    meta["command"] = meta["command"].strip()
    with tempfile.TemporaryDirectory(prefix="mindfed-bench-") as scratch:
        work = args.keep or Path(scratch)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            rows = measure(args, work, progress, meta["load_average"])
    meta["wall_s"] = time.perf_counter() - started
    stem = "results-quick" if args.quick else "results-partial" if args.only else "results"
    out = Path(__file__).parent
    table = results.write(rows, meta, json_path=out / f"{stem}.json", md_path=out / f"{stem}.md")
    print(table)
    console.print(f"written: {out / stem}.json and .md ({meta['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
