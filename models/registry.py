"""Explicit model registry: `@register(name)` on a class; duplicate names raise."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)

_MODELS: dict[str, type] = {}


def register(name: str) -> Callable[[T], T]:
    def decorator(cls: T) -> T:
        if name in _MODELS:
            raise ValueError(f"a model named '{name}' is already registered ({_MODELS[name]})")
        cls.registry_name = name
        _MODELS[name] = cls
        return cls

    return decorator


def _load_builtin_models() -> None:
    # Importing the modules runs their @register decorators.
    import models.audit_controls
    import models.ctgan_dp
    import models.timegan  # noqa: F401


def get_model_class(name: str) -> type:
    _load_builtin_models()
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model '{name}'; registered: {sorted(_MODELS)}") from None


def registered_models() -> list[str]:
    _load_builtin_models()
    return sorted(_MODELS)
