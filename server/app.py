"""Flower ServerApp: reads the run settings and runs the phases over the Grid."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from configs.settings import settings_from_run_config
from server.federation import run_federation

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = settings_from_run_config(dict(context.run_config))
    out_dir = Path(str(context.run_config.get("out-dir", "mindfed-out")))
    resume = str(context.run_config.get("resume", False)).lower() in ("true", "1")
    try:
        metrics = run_federation(grid, settings, out_dir, resume=resume)
    except Exception as err:
        # Said plainly in the run's log (flwr run --stream shows it); every release is written
        # whole or not at all, so out-dir holds no half-written bundle or synthetic table.
        logger.error(
            "MindFed run FAILED: %s: %s (no release written to %s)", type(err).__name__, err, out_dir
        )
        raise
    logger.info(
        "run finished: column-shape vs DP reference %.4f, results in %s",
        metrics["final"]["column_shape_vs_dp_reference"],
        out_dir,
    )
