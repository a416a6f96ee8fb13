"""The model registry, a leaf: built-in models by import path, others registered by name."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)

# Every model a run config may name, in one place. Imported only when asked for, so this
# module imports no model (and no model module imports another through it).
BUILTIN_MODELS: dict[str, str] = {
    "dp-ctgan": "models.ctgan_dp:DPCTGAN",
    "gbm": "models.risk.gbm:GradientBoostingRisk",
    "hhg": "models.hhg.model:HybridGenerator",
    "hybrid-lstm": "models.risk.neural:HybridLSTM",
    "pgm": "models.pgm.model:PrivatePGM",
    "timegan": "models.sequence.timegan:TimeGAN",
    "transformer": "models.risk.neural:RiskTransformer",
}
# Modules to import before the first look-up, each registering models with `register`: set by
# whoever runs the process (a test, a node's operator), never by a run config. Comma-separated.
PLUGINS_ENV = "MINDFED_MODEL_PLUGINS"

_MODELS: dict[str, type] = {}
_plugins_loaded = False


class UnknownModelError(KeyError):
    """A run config or bundle names a model this process does not have."""


def register(name: str) -> Callable[[T], T]:
    """Class decorator adding a model under `name`; a name already taken (built-in too) raises."""

    def decorator(cls: T) -> T:
        if name in _MODELS or name in BUILTIN_MODELS:
            raise ValueError(f"a model named '{name}' is already registered")
        cls.registry_name = name
        _MODELS[name] = cls
        return cls

    return decorator


def unregister(name: str) -> None:
    """Remove a model added with `register` (tests that register one for a while)."""
    if name in BUILTIN_MODELS:
        raise ValueError(f"'{name}' is built in and cannot be removed")
    _MODELS.pop(name, None)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)


def get_model_class(name: str) -> type:
    """The class registered under `name`; an unknown name's error lists the allowed ones."""
    _load_plugins()
    if name in _MODELS:
        return _MODELS[name]
    if name not in BUILTIN_MODELS:
        raise UnknownModelError(f"unknown model '{name}'; allowed: {registered_models()}")
    module, _, attribute = BUILTIN_MODELS[name].partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    cls.registry_name = name
    _MODELS[name] = cls
    return cls


def registered_models() -> list[str]:
    """Every name a run config may use: the built-in models and those registered in this process."""
    _load_plugins()
    return sorted({*BUILTIN_MODELS, *_MODELS})
