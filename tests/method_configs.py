"""A small config of every built-in method, for tests that run all methods through one scenario."""

from __future__ import annotations

from typing import Any

import specpeft

# Options beyond target_modules that keep a method's tiny-model run meaningful (defaults otherwise).
_OVERRIDES: dict[str, dict[str, Any]] = {}


def small_config(name: str, targets: list[str] | str) -> Any:
    """A fresh config of method `name` adapting `targets`."""
    config_cls = specpeft.get_method(name).config_cls
    return config_cls(target_modules=targets, **_OVERRIDES.get(name, {}))
