"""The rows every measurement returns, the machine they ran on, and the JSON + markdown writers."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_JSON = Path(__file__).with_name("results.json")
RESULTS_MD = Path(__file__).with_name("results.md")


@dataclass
class Row:
    """One figure beside its reference from the same run: value / reference is the ratio."""

    section: str  # which of the five measurements
    name: str
    value: float | None
    reference: float | None
    unit: str  # "s", "MiB", "rows/s", "s/step" ...; the reference's unless `reference_unit`
    reference_name: str
    goal: str = ""  # e.g. "ratio <= 1.5"; empty: no goal, the figure is for information
    met: bool | None = None
    note: str = ""  # what bounds a missed goal, or how the figure was taken
    reference_unit: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """value / reference (None when either is missing or the reference is 0)."""
        if self.value is None or not self.reference:
            return None
        return self.value / self.reference


def machine() -> dict[str, Any]:
    """CPU count, memory, load, library versions and the date: what the figures depend on."""
    import flwr
    import opacus
    import ray
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with open("/proc/meminfo", encoding="ascii") as f:
        total_kib = int(f.readline().split()[1])
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cpus": cpus,
        "memory_gib": round(total_kib / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?",
        "opacus": opacus.__version__,
        "ray": ray.__version__,
    }


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 0.1 else 4
    return f"{value:,.{digits}f} {unit}".strip()


def _met(row: Row) -> str:
    return "" if not row.goal else "yes" if row.met else "no" if row.met is not None else "?"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """Every row as a line of one table (by section), with the machine and run facts above it."""
    m = meta["machine"]
    loads = ", ".join(f"{when} {avg[0]:.1f}" for when, avg in meta.get("load_average", {}).items())
    lines = [
        f"{m['date'][:10]} | {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB | torch {m['torch']}, "
        f"flwr {m['flwr']}, opacus {m['opacus']}, ray {m['ray']} | `{meta['command']}` took "
        f"{meta['wall_s'] / 60:.1f} min",
        "",
        f"Load average (1 min, own processes included): at start {m['load_average_at_start'][0]:.1f}"
        + (f", {loads}" if loads else ""),
        "",
        "| section | figure | value | reference (same run) | ratio | goal | met | note |",
        "|---|---|---:|---|---:|---|---|---|",
    ]
    for r in rows:
        ref_unit = r.reference_unit or r.unit
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        lines.append(
            f"| {r.section} | {r.name} | {_num(r.value, r.unit)} | {r.reference_name}: "
            f"{_num(r.reference, ref_unit)} | {ratio} | {r.goal} | {_met(r)} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def write(rows: list[Row], meta: dict[str, Any], *, json_path: Path, md_path: Path) -> str:
    """Write results.json (rows with ratios, meta) and results.md; return the markdown."""
    payload = {
        "meta": meta,
        "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    text = markdown(rows, meta)
    md_path.write_text(text, encoding="utf-8")
    return text
