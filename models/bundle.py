"""Model bundles: safetensors weights + encoder + schema + a model card with content hashes."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors.torch import load_file, save_file

from configs.schema import CohortSchema
from models.encoder import TabularEncoder
from models.registry import get_model_class
from privacy.storage import atomic_directory

WEIGHTS_FILE = "model.safetensors"
ENCODER_FILE = "encoder.json"
SCHEMA_FILE = "schema.json"
CARD_FILE = "model_card.json"


class BundleError(ValueError):
    """A bundle is missing a file, fails its hash check, or does not fit together."""


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_bundle(folder: Path, *, model: Any, card: dict[str, Any]) -> dict[str, Any]:
    """Write the bundle whole or not at all; the card records each file's SHA-256."""
    with atomic_directory(folder) as staging:
        # Generators export their sampler only (no discriminator); a risk model its whole state.
        exported = model.sampler_state_dict() if hasattr(model, "sampler_state_dict") else model.state_dict()
        tensors = {k: v.contiguous() for k, v in exported.items()}
        save_file(tensors, str(staging / WEIGHTS_FILE))
        (staging / ENCODER_FILE).write_text(model.encoder.to_json(), encoding="utf-8")
        schema_json = json.dumps(model.encoder.schema.model_dump(mode="json"), indent=2)
        (staging / SCHEMA_FILE).write_text(schema_json, encoding="utf-8")
        full_card = {
            **card,
            "model": model.registry_name,
            "model_params": model.config.model_dump(mode="json"),
            "schema_hash": model.encoder.schema.schema_hash(),
            "encoder_hash": model.encoder.hash,
            "files": {
                name: sha256_file(staging / name) for name in (WEIGHTS_FILE, ENCODER_FILE, SCHEMA_FILE)
            },
        }
        (staging / CARD_FILE).write_text(json.dumps(full_card, indent=2), encoding="utf-8")
    return full_card


SEQUENCE_BUNDLE = "sequence"  # sub-folder holding the linked sequence model, when there is one
RISK_BUNDLE = "risk"  # sub-folder holding one bundle per trained risk model


def synthetic_ids(n: int) -> list[str]:
    return [f"S{i:06d}" for i in range(1, n + 1)]


def sample_linked(
    table: Any, sequence: Any | None, n: int, *, seed: int, label_shares: dict[str, float] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """`n` synthetic profiles with ids, and each one's week from the sequence model (if any).

    `label_shares` (e.g. {"high": 0.5}) asks for that mix of the label's classes, from a static
    model that can sample by label; others refuse it.
    """
    if label_shares:
        if "label_shares" not in inspect.signature(table.sample).parameters:
            raise BundleError(f"model '{table.registry_name}' cannot sample by label")
        static = table.sample(n, seed=seed, label_shares=label_shares)
    else:
        static = table.sample(n, seed=seed)
    static.insert(0, table.encoder.schema.id_column, synthetic_ids(n))
    return static, (sequence.sample(static, seed=seed) if sequence is not None else None)


def load_linked_bundle(folder: str | Path) -> tuple[Any, Any | None, dict[str, Any]]:
    """The static model, the sequence model when the bundle carries one, and the static card."""
    table, card = load_bundle(folder)
    sequence_folder = Path(folder) / SEQUENCE_BUNDLE
    sequence = load_bundle(sequence_folder)[0] if sequence_folder.is_dir() else None
    return table, sequence, card


def load_bundle(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild the sampler from a bundle after checking every file against the card."""
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise BundleError(f"{folder} is not a model bundle: {CARD_FILE} not found")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{card_path} is not a valid JSON model card: {err}") from None
    files = card.get("files") if isinstance(card, dict) else None
    if not isinstance(files, dict) or set(files) != {WEIGHTS_FILE, ENCODER_FILE, SCHEMA_FILE}:
        raise BundleError(
            f"{card_path} must list the SHA-256 of {WEIGHTS_FILE}, {ENCODER_FILE}, {SCHEMA_FILE}"
        )
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle file {path} does not match the SHA-256 in its model card")
    try:
        schema = CohortSchema.model_validate_json((folder / SCHEMA_FILE).read_text(encoding="utf-8"))
        encoder = TabularEncoder.from_json((folder / ENCODER_FILE).read_text(encoding="utf-8"), schema)
        model = get_model_class(card["model"])(encoder, card["model_params"])
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False)
    except (KeyError, ValueError, RuntimeError) as err:  # hashes matched, but the parts disagree
        raise BundleError(f"bundle {folder} cannot be loaded: {err}") from None
    return model, card
