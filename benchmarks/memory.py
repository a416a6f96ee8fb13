"""Issue item 5: peak memory of one hospital's local DP-SGD rounds, per model, in a fresh process.

Each model runs in its own subprocess: imports (torch, Opacus, the model code), one demo
hospital's patients encoded and the model built; its resident set then (VmRSS) is the reference,
the process idle before training. The peak mark (VmHWM) is reset there, then one DP-SGD local
round of every phase runs (Opacus "hooks", the default) and VmHWM is read: the resident peak of
the whole process while it trained (Python and torch's CPU allocations alike; a transient peak
of the imports cannot hide it, as it would in ru_maxrss). A Ray actor also holds Flower and Ray.

    python -m benchmarks.memory MODEL PATIENTS QUICK   # the child; the parent calls `measure`
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.procmem import max_rss_mib, peak_rss_mib, reset_peak, rss_mib, run_child
from benchmarks.results import Row

SECTION = "5 hospital memory"
REPO = Path(__file__).resolve().parent.parent


def _child(name: str, patients: int, quick: bool) -> dict[str, float]:
    """RSS idle (after imports, data, model) and its peak during one DP round of each phase."""
    import warnings

    import torch

    from benchmarks.gpu_ratios import round_jobs, timed_round
    from configs.settings import load_settings
    from tests.support.round_models import demo_data, tiny_params

    warnings.filterwarnings("ignore")
    run = load_settings()
    torch.set_num_threads(run.runtime.threads_per_client)
    encoder, data = demo_data(patients, seed=21)
    params = {name: tiny_params(name) if quick else run.model.params_for(name)}
    jobs = list(round_jobs(encoder, data, params=params, batch_size=run.federation.batch_size, models=[name]))
    idle = rss_mib()
    reset_peak()
    steps = sum(timed_round(job, torch.device("cpu"), job.data)[1] for job in jobs)
    peak = peak_rss_mib()
    return {
        "idle_mib": idle,
        "peak_mib": peak,
        "lifetime_max_rss_mib": max_rss_mib(),
        "steps": steps,
        "phases": len(jobs),
    }


def measure(quick: bool, models: list[str], advance: Callable[[str], None]) -> list[Row]:
    """One row per model: its rounds' peak RSS beside the same process idle before training."""
    from configs.settings import load_settings

    run = load_settings()
    patients = 256 if quick else run.federation.patients // run.federation.hospitals
    rows = []
    for name in models:
        try:
            got = run_child("benchmarks.memory", name, str(patients), str(int(quick)), cwd=REPO)
        except RuntimeError as err:
            rows.append(Row(SECTION, name, None, None, "MiB", "idle", note=f"failed: {err}"))
            advance(name)
            continue
        rows.append(
            Row(
                section=SECTION,
                name=f"{name}: peak RSS, one DP round per phase ({got['phases']})",
                value=got["peak_mib"],
                reference=got["idle_mib"],
                unit="MiB",
                reference_name="same process before training",
                note=f"{patients} patients, {got['steps']} DP-SGD steps; VmHWM of a plain process",
                detail=got,
            )
        )
        advance(name)
    return rows


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")))
