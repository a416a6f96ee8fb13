"""Issue item 4: rows per second of `mindfed generate`'s sampling from each exported static generator,
beside the `ctgan` package's `CTGAN.sample` on the same row count, and the whole command's time.

The bundles come from federations run in the same benchmark. Ours, in fresh processes (2 per
bundle, each part's fastest kept; 1 with --quick): the code path of `mindfed generate`
(`load_linked_bundle`, `sample_linked`, the CSVs) with each part timed; rows/s is the fastest of
3 further `sample_linked` calls of the static profiles (the first call also compiles pgm's JAX
code: its time is in the breakdown). CTGAN: fitted one epoch on the demo cohort's static table
(sampling speed does not depend on fit quality), then the fastest of 3 `CTGAN.sample(n)`. The
command itself, `mindfed generate -n N`, is timed from outside in fresh processes (the faster of
2 runs; 1 with --quick).

    python -m benchmarks.sampling BUNDLE N   # the child; the parent calls `measure`
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.procmem import run_child
from benchmarks.results import Row

SECTION = "4 sampling"
GOAL_N = 100_000
GOAL_S = 10.0
REPEATS = 3  # warm samplings (ours and CTGAN's): the fastest is kept, other jobs share the CPUs
REPO = Path(__file__).resolve().parent.parent


def ctgan_rows_per_s(n: int, *, patients: int, seed: int) -> tuple[float, float]:
    """(rows/s of CTGAN.sample(n), seconds of its one-epoch fit) on the demo static table."""
    from ctgan import CTGAN

    from configs.schema import load_schema
    from simulation.cohort import generate_demo_cohort

    schema = load_schema()
    table = generate_demo_cohort(patients, seed=seed).static.drop(columns=[schema.id_column])
    discrete = [c.name for c in schema.columns if c.is_categorical]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CTGAN(epochs=1, enable_gpu=False)
        started = time.perf_counter()
        model.fit(table, discrete_columns=discrete)
        fit_s = time.perf_counter() - started
        best = float("inf")
        for _ in range(REPEATS):
            started = time.perf_counter()
            rows = model.sample(n)
            best = min(best, time.perf_counter() - started)
    return len(rows) / best, fit_s


def static_only(bundle: Path, into: Path) -> Path:
    """A copy of `bundle` without its linked sequence and risk bundles (the card covers the rest)."""
    shutil.copytree(bundle, into, ignore=shutil.ignore_patterns("sequence", "risk"), dirs_exist_ok=True)
    return into


def _child(bundle: Path, n: int) -> dict[str, Any]:
    """`mindfed generate`'s steps timed one by one, then a second (warm) static sampling."""
    clock = time.perf_counter()
    from models.bundle import load_linked_bundle, sample_linked

    parts: dict[str, Any] = {"imports_s": time.perf_counter() - clock}
    clock = time.perf_counter()
    table, sequence, card = load_linked_bundle(bundle)
    parts["load_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    static, _ = sample_linked(table, None, n, seed=0)
    parts["profiles_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    weeks = sequence.sample(static, seed=0) if sequence is not None else None
    parts["weeks_s"] = time.perf_counter() - clock
    with tempfile.TemporaryDirectory() as scratch:
        clock = time.perf_counter()
        static.to_csv(Path(scratch) / "a.csv", index=False)
        if weeks is not None:
            weeks.to_csv(Path(scratch) / "b.csv", index=False)
        parts["csv_s"] = time.perf_counter() - clock
    warm = []
    for seed in range(1, REPEATS + 1):
        clock = time.perf_counter()
        sample_linked(table, None, n, seed=seed)
        warm.append(time.perf_counter() - clock)
    parts["warm_profiles_s"] = min(warm)
    return {**parts, "model": card.get("model", "?"), "rows": len(static)}


def _run_child(bundle: Path, n: int) -> dict[str, Any]:
    return run_child("benchmarks.sampling", str(bundle), str(n), cwd=REPO)


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each timed part at its fastest over fresh processes (other jobs share the CPUs)."""
    return {k: min(r[k] for r in runs) if k.endswith("_s") else runs[0][k] for k in runs[0]}


def command_seconds(bundle: Path, n: int, runs: int) -> tuple[float, str]:
    """Fewest wall seconds of `mindfed generate --model BUNDLE -n N` over `runs` fresh processes,
    and "" or the command's error."""
    times = [_command_once(bundle, n) for _ in range(runs)]
    return min(t for t, _ in times), next((e for _, e in times if e), "")


def _command_once(bundle: Path, n: int) -> tuple[float, str]:
    mindfed = shutil.which("mindfed") or str(Path(sys.executable).with_name("mindfed"))
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        done = subprocess.run(
            [mindfed, "generate", "--model", str(bundle), "-n", str(n), "--out", f"{scratch}/s.csv"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        seconds = time.perf_counter() - started
    error = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1][:160]
    return seconds, error


def measure(bundles: dict[str, Path], quick: bool, advance: Callable[[str], None]) -> list[Row]:
    """Per bundle: static rows/s beside CTGAN's, and the command's wall time beside the 10 s goal."""
    n = 20_000 if quick else GOAL_N
    reference, fit_s = ctgan_rows_per_s(n, patients=1000 if quick else 4000, seed=7)
    advance("ctgan")
    rows = []
    for label, bundle in bundles.items():
        try:
            parts = _fastest([_run_child(bundle, n) for _ in range(1 if quick else 2)])
        except Exception as err:  # a bundle that fails to sample is a finding
            rows.append(Row(SECTION, f"{label}: sampling", None, reference, "rows/s", "ctgan", note=str(err)))
            advance(label)
            continue
        if parts["weeks_s"] == 0.0 or not label.endswith("+ weeks"):
            rows.append(
                Row(
                    section=SECTION,
                    name=f"{label} ({parts['model']}): sample_linked profiles, n={n:,}",
                    value=n / parts["warm_profiles_s"],
                    reference=reference,
                    unit="rows/s",
                    reference_name=f"ctgan CTGAN.sample, n={n:,}",
                    note=f"first call {n / parts['profiles_s']:,.0f} rows/s; CTGAN fitted 1 epoch "
                    f"({fit_s:.1f} s, untimed)",
                    detail=parts,
                )
            )
        rows.append(_command_row(label, bundle, n, parts, quick))
        advance(label)
    return rows


def _breakdown(parts: dict[str, Any]) -> str:
    names = {"imports_s": "imports", "load_s": "bundle load", "profiles_s": "profiles", "weeks_s": "weeks"}
    names["csv_s"] = "CSV"
    return ", ".join(f"{label} {parts[key]:.1f}" for key, label in names.items() if parts[key] >= 0.05)


def _command_row(label: str, bundle: Path, n: int, parts: dict[str, Any], quick: bool) -> Row:
    seconds, error = command_seconds(bundle, n, 1 if quick else 2)
    in_process = sum(parts[k] for k in ("load_s", "profiles_s", "weeks_s", "csv_s"))
    judged = not quick and n == GOAL_N and not error
    met = seconds <= GOAL_S if judged else None
    note = f"fresh process: {_breakdown(parts)} s"
    if error:
        note = f"failed: {error}"
    elif met is False:
        slowest = max(("load_s", "profiles_s", "weeks_s", "csv_s", "imports_s"), key=parts.__getitem__)
        note += f"; misses by {seconds - GOAL_S:.1f} s ({seconds / GOAL_S:.2f}x), most in {slowest[:-2]}"
    elif quick:
        note += f"; quick: n={n:,}, the goal is for {GOAL_N:,}"
    return Row(
        section=SECTION,
        name=f"{label}: `mindfed generate -n {n:,}`",
        value=seconds,
        reference=in_process,
        unit="s",
        reference_name="its load + sampling + CSV, timed inside",
        goal=f"<= {GOAL_S:.0f} s" if n == GOAL_N else "",
        met=met,
        note=note,
    )


if __name__ == "__main__":
    print(json.dumps(_child(Path(sys.argv[1]), int(sys.argv[2]))))
