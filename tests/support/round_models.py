"""Every federated round model on demo data: which models train in rounds, small configs, DP round plans.

Shared by the GPU tests and `benchmarks/gpu_ratios.py`, so both train the same models the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from configs.schema import load_schema
from models.base import ROUND_KINDS, LocalData, LocalRound
from models.encoder import TabularEncoder
from models.registry import get_model_class
from models.risk.features import encode_patients
from models.statistics import histogram_counts
from privacy.dp_training import DPSpec
from privacy.ledger import PrivacyLedger
from simulation.cohort import generate_demo_cohort

# Small networks, a key per knob of some model's Config (each model takes the keys it has): a
# local round of any of them takes well under a second.
TINY: dict[str, Any] = {
    "embedding_dim": 8,
    "generator_dims": (16,),
    "discriminator_dims": (16,),
    "hidden_dim": 8,
    "num_layers": 1,
    "noise_dim": 4,
    "latent_dim": 4,
    "diffusion_steps": 8,
    "lstm_hidden_dim": 8,
    "heads": 2,
    "layers": 1,
    "feedforward_dim": 16,
}


def why_not_a_round_model(name: str) -> str:
    """Empty for a model that trains in federated DP-SGD rounds, else why it does not (for a skip)."""
    cls = get_model_class(name)
    if cls.kind not in ROUND_KINDS:
        return f"'{name}' is a {cls.kind}: no local training rounds"
    if not getattr(cls, "federated", True):
        return f"'{name}' trains on the server only (not federated)"
    return ""


def tiny_params(name: str) -> dict[str, Any]:
    """The TINY knobs that `name`'s Config has."""
    fields = get_model_class(name).Config.model_fields
    return {key: value for key, value in TINY.items() if key in fields}


def demo_data(patients: int, *, seed: int) -> tuple[TabularEncoder, LocalData]:
    """An encoder from the demo cohort's exact histograms and its patients as every model reads them."""
    schema = load_schema()
    cohort = generate_demo_cohort(patients, seed=seed)
    encoder = TabularEncoder.from_histograms(schema, histogram_counts(cohort.static, schema))
    return encoder, encode_patients(encoder, cohort.static, cohort.timeseries)


def dp_round_plans(
    name: str,
    *,
    device: torch.device,
    ledger: PrivacyLedger,
    batch_size: int,
    seed: int,
    noise_multiplier: float = 1.0,
) -> list[LocalRound]:
    """One local DP round per phase of the model (one plan for a model without phases)."""
    dp = DPSpec(noise_multiplier=noise_multiplier, clipping_norm=1.0, ledger=ledger, label=f"{name} round")
    phases = get_model_class(name).phases or ("",)
    return [
        LocalRound(epochs=1, batch_size=batch_size, dp=dp, device=device, seed=seed, phase=phase)
        for phase in phases
    ]
