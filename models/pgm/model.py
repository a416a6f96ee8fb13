"""Private-PGM as a statistics generator: chosen marginals measured by the hospitals, summed, estimated."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.base import ModelKind
from models.encoder import EncoderError, TabularEncoder
from models.pairs import column_pairs
from models.pgm import estimation
from models.pgm.domain import from_cells
from models.pgm.marginals import Clique, Measurement, clique_key, clique_of
from models.pgm.sampling import sample_cells
from models.pgm.selection import label_cliques, spanning_tree, survey_weights

logger = logging.getLogger(__name__)

POTENTIAL_PREFIX = "potential."


class PrivatePGM:
    """Private-PGM (McKenna et al.): a graphical model estimated from noisy marginal tables.

    Round 1 surveys every column pair on coarse cells; from those noisy sums the server picks
    MST's maximum spanning tree (edge weight: departure from independence, less what noise alone
    would give) and 3-way tables of the label with each pair of its most associated columns (a
    tree keeps one path between two columns; a label that depends on several scores together
    needs them jointly). Round 2 measures the chosen tables and every column's 1-way table on its
    public bins. "aim" adds a round: the server fits, finds the pairs the model explains worst
    against the survey and measures those too, as long as the model stays small. Each round is
    one Gaussian release per hospital on its own members (its ledger); the server sums the
    tables and `mbi` estimates the model from the sums.
    """

    registry_name = "pgm"
    kind: ClassVar[ModelKind] = ModelKind.STATISTICS_GENERATOR
    releases: ClassVar[tuple[str, ...]] = ()
    phases: ClassVar[tuple[str, ...]] = ()

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        @model_validator(mode="after")
        def _shares_leave_room(self) -> PrivatePGM.Config:
            if self.selection == "aim" and self.survey_share + self.aim_share >= 1:
                raise ValueError("survey_share + aim_share must leave the chosen tables a share (< 1)")
            return self

        selection: Literal["mst", "aim"] = "mst"
        # the label's tables with its this many most associated columns, alone and in pairs
        label_neighbours: int = Field(default=3, ge=0, le=5)
        survey_share: float = Field(default=0.3, gt=0, lt=1)  # of the budget, for round 1
        survey_table_cells: int = Field(default=30, ge=4)  # most cells of a surveyed pair's table
        aim_share: float = Field(default=0.25, gt=0, lt=1)  # of the budget, for the adaptive round
        aim_pairs: int = Field(default=4, ge=1, le=36)  # pairs the adaptive round may add
        max_model_cells: int = Field(default=2_000_000, ge=1000)  # junction tree size for "aim"
        iterations: int = Field(default=1500, ge=50, le=20000)  # mirror descent

    def __init__(self, encoder: TabularEncoder, config: Config | dict, *, seed: int = 0):
        # `seed` is the contract's; nothing here is random until `sample`, which takes its own.
        self.encoder = encoder
        self.config = config if isinstance(config, self.Config) else self.Config(**config)
        self.schema = encoder.schema
        self.survey: list[Measurement] = []  # round 1: every pair, for selection
        self.measurements: list[Measurement] = []  # the tables the model is fit on
        self.potentials: dict[Clique, np.ndarray] = {}
        self.total = 1.0
        self._model: Any = None
        self._round = 0

    # ---------------------------------------------------------------- measurement rounds
    def measurement_weights(self) -> tuple[float, ...]:
        """The public split of this model's budget over its measurement rounds."""
        survey = self.config.survey_share
        if self.config.selection == "aim":
            return (survey, 1.0 - survey - self.config.aim_share, self.config.aim_share)
        return (survey, 1.0 - survey)

    def select_measurements(self, round_index: int, statistics: dict[str, Any]) -> list[Clique]:
        """The column sets round `round_index` measures (chosen from DP outputs only)."""
        self._round = round_index
        if round_index == 1:
            return [(a.name, b.name) for a, b in column_pairs(self.schema)]
        weights = survey_weights(self.survey)
        if round_index == 2:
            tree = spanning_tree(weights, self.schema)
            label = [
                c for c in label_cliques(weights, self.schema, self.config.label_neighbours) if c not in tree
            ]
            return [(name,) for name in self.schema.column_names] + tree + label
        self.fit_statistics(statistics)
        return estimation.worst_explained_pairs(
            self._model,
            self.survey,
            self.schema,
            current=[m.clique for m in self.measurements],
            count=self.config.aim_pairs,
            max_cells=self.config.max_model_cells,
        )

    def measurement_table_cells(self, round_index: int) -> int | None:
        """The survey's tables are coarse (each pair's association stands out of the noise), the
        chosen ones finer (`models.pgm.marginals.TABLE_CELLS`)."""
        return self.config.survey_table_cells if round_index == 1 else None

    def observe(self, tables: dict[str, np.ndarray], noise_sd: float) -> None:
        """Summed noisy tables of the round just measured, with the per-cell sd of their noise."""
        cells = self.measurement_table_cells(self._round)
        measured = [Measurement(clique_of(key), np.asarray(t), noise_sd, cells) for key, t in tables.items()]
        (self.survey if self._round == 1 else self.measurements).extend(measured)

    def fit_statistics(self, statistics: dict[str, Any]) -> None:
        """Estimate the graphical model from the chosen tables, and the survey's tables of the
        pairs among them (post-processing of DP outputs only)."""
        if not self.measurements:
            raise EncoderError("pgm: no marginal was measured, nothing to estimate")
        chosen = [set(m.clique) for m in self.measurements]
        extra = [m for m in self.survey if any(set(m.clique) <= c for c in chosen)]
        used = self.measurements + extra
        self._model = estimation.estimate(self.schema, used, iterations=self.config.iterations)
        self.potentials, self.total = estimation.potentials_of(self._model)
        logger.info("pgm: estimated from %d noisy tables, total %.0f", len(used), self.total)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted potentials (log-space factors per clique) and the total; no record, no table."""
        state = {
            POTENTIAL_PREFIX + clique_key(c): torch.from_numpy(np.asarray(v).copy())
            for c, v in self.potentials.items()
        }
        state["total"] = torch.tensor(float(self.total), dtype=torch.float64)
        return state

    def sampler_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        unexpected = [k for k in state if k != "total" and not k.startswith(POTENTIAL_PREFIX)]
        if unexpected or "total" not in state:
            raise KeyError(
                f"pgm state needs 'total' and '{POTENTIAL_PREFIX}*' entries, got {sorted(state)[:5]}"
            )
        potentials = {
            clique_of(k.removeprefix(POTENTIAL_PREFIX)): v.detach().cpu().numpy().astype(np.float64)
            for k, v in state.items()
            if k.startswith(POTENTIAL_PREFIX)
        }
        estimation.check_potentials(potentials, self.schema)
        self.potentials, self.total = potentials, float(state["total"])
        self._model = estimation.model_from(self.schema, self.potentials, self.total) if potentials else None

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, *, seed: int, label_shares: dict[str, float] | None = None) -> pd.DataFrame:
        """`n` rows drawn from the model; `label_shares` (e.g. {"high": 0.5}) reweights the label's
        classes while keeping every other column's relationship with the label."""
        if n == 0:
            return from_cells(
                np.zeros((0, len(self.schema.columns)), np.int64), self.schema, np.random.default_rng(0)
            )
        if self._model is None:
            raise EncoderError("pgm: the model is not fitted yet")
        model = self._model
        if label_shares:
            model = estimation.reweighted_label(model, self.schema, label_shares)
        rng = np.random.default_rng(seed)
        return from_cells(sample_cells(model, self.schema, n, rng), self.schema, rng)
