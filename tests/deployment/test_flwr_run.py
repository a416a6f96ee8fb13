"""`flwr run .` as a new user runs it: a fresh FLWR_HOME, Flower's 2 default simulated SuperNodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.runs import NO_RISK_OVERRIDES

pytestmark = pytest.mark.deployment

ROOT = Path(__file__).resolve().parents[2]
# The README's overrides, made small; the demo expects 3 hospitals and Flower starts 2 nodes.
OVERRIDES = " ".join(
    [
        "federation.patients=300",
        "federation.join_timeout_s=5.0",
        "export.synthetic_rows=200",
        "export.round_sample_rows=100",
        "audit.synthetic_rows=100",
        "audit.bootstrap=20",
        "audit.release_on_fail=true",
        "model.timegan.hidden_dim=8",
        "stages.timegan.phases={embedding=1,supervised=1,joint=1}",
        NO_RISK_OVERRIDES,
    ]
)


def _superlinks(home: Path) -> list[int]:
    """Process ids of the local SuperLinks Flower started under this FLWR_HOME."""
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_flwr_run_on_a_fresh_machine_finishes_with_the_nodes_it_has(tmp_path: Path) -> None:
    home, out = tmp_path / "flwr-home", tmp_path / "flwr-out"
    flwr = Path(sys.executable).with_name("flwr")
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    config = f'out-dir="{out}" overrides="{OVERRIDES}"'
    try:
        result = subprocess.run(
            [str(flwr), "run", ".", "--stream", "--run-config", config],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
    finally:
        for pid in _superlinks(home):  # Flower leaves its local SuperLink running: stop it
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _superlinks(home) and time.monotonic() < deadline:
            time.sleep(0.5)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "expected 3 node(s) (federation.hospitals), 2 connected after 5s: going on with 2" in log
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert sorted(h["hospital"] for h in metrics["hospitals"]) == ["hospital-1", "hospital-2"]
    assert (out / "bundle" / "model_card.json").is_file() and (out / "report.html").is_file()
    assert _superlinks(home) == []
