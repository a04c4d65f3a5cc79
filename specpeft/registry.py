"""Method registry: method name → config class, adapter class and peft tuner; open to third-party methods.

A third party adds a method without editing specpeft::

    from dataclasses import dataclass
    from specpeft import MethodAdapter, SpecPeftConfig, register_method

    @dataclass
    class ScaleConfig(SpecPeftConfig):
        METHOD = "SCALE"          # the peft_type written to adapter_config.json; name.upper()

    class ScaleAdapter(MethodAdapter):
        ...                       # create(), delta_weight(), forward()

    register_method("scale", ScaleConfig, ScaleAdapter)

After registration `get_adapter_model`, `save_pretrained`, `load_adapter_model` and stock
`peft.PeftModel.from_pretrained` all handle the method; attribute names start with the prefix "scale_".
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import _peft_compat
from .adapters.base import MethodAdapter
from .adapters.bridge import AdapterModel, make_tuner
from .adapters.config import MethodType, SpecPeftConfig

# Built-in methods: module under specpeft.adapters exposing REGISTRATION = dict(name=..., config_cls=..., ...).
_BUILTIN_MODULES: tuple[str, ...] = ("svfit", "flora", "fedsvd", "soka", "snella", "tera")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: lower-case method name; the attribute prefix is `name + "_"`.
        config_cls: its config class.
        adapter_cls: its per-layer adapter (None for methods built on another peft tuner, e.g. FedSVD on LoRA).
        tuner_cls: the generated peft tuner class (None with a custom `builder`).
        builder: `builder(model, config, adapter_name) -> PeftModel` replacing the default peft injection.
        description: one line shown by `list_methods(details=True)`.
    """

    name: str
    config_cls: type
    adapter_cls: Optional[type[MethodAdapter]] = None
    tuner_cls: Optional[type[AdapterModel]] = None
    builder: Optional[Callable[..., Any]] = None
    description: str = ""


_METHODS: dict[str, MethodSpec] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*$")


def register_method(
    name: str,
    config_cls: type,
    adapter_cls: Optional[type[MethodAdapter]] = None,
    *,
    builder: Optional[Callable[..., Any]] = None,
    description: str = "",
) -> MethodSpec:
    """Register a method so every specpeft and peft entry point handles it.

    Args:
        name: lower-case identifier (letters and digits); must not clash with a peft method or a registered one.
        config_cls: a `SpecPeftConfig` subclass with `METHOD = name.upper()` (any dataclass with a `builder`).
        adapter_cls: the `MethodAdapter` subclass holding the method's math; required unless `builder` is given.
        builder: optional `builder(model, config, adapter_name) -> PeftModel`, for methods that reuse a stock peft
            tuner (FedSVD builds a peft LoRA).
        description: one line for `list_methods`.

    Returns:
        The `MethodSpec` stored in the registry.
    """
    if not _NAME.match(name):
        raise ValueError(f"Method name {name!r} must be lower-case letters and digits, starting with a letter.")
    if name in _METHODS:
        raise ValueError(f"Method '{name}' is already registered ({_METHODS[name].config_cls.__name__}).")
    peft_type = name.upper()
    if peft_type in _peft_compat.PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"Method name '{name}' clashes with peft's own method {peft_type}; choose another name.")
    if builder is None:
        if adapter_cls is None or not issubclass(adapter_cls, MethodAdapter):
            raise TypeError(f"register_method('{name}'): adapter_cls must be a MethodAdapter subclass.")
        missing = sorted(getattr(adapter_cls, "__abstractmethods__", ()))
        if missing:
            raise TypeError(f"register_method('{name}'): {adapter_cls.__name__} does not implement {missing}.")
        if not issubclass(config_cls, SpecPeftConfig):
            raise TypeError(f"register_method('{name}'): config_cls must subclass specpeft.SpecPeftConfig.")
        if config_cls.METHOD != peft_type:
            raise ValueError(f"{config_cls.__name__}.METHOD is {config_cls.METHOD!r}; it must be {peft_type!r}.")
        tuner_cls = make_tuner(name, adapter_cls)
        _peft_compat.register_peft_type(MethodType(peft_type), config_cls, tuner_cls, tuner_cls.prefix)
        spec = MethodSpec(name, config_cls, adapter_cls, tuner_cls, None, description)
    else:
        spec = MethodSpec(name, config_cls, adapter_cls, None, builder, description)
    _METHODS[name] = spec
    return spec


def list_methods(details: bool = False) -> list[str] | dict[str, str]:
    """Names of the registered methods (with their descriptions when `details=True`)."""
    if details:
        return {name: spec.description for name, spec in sorted(_METHODS.items())}
    return sorted(_METHODS)


def get_method(key: str | object) -> MethodSpec:
    """The spec for a method name, a peft_type string, a config instance or a config class."""
    if isinstance(key, str):
        name = key.lower()
        if name in _METHODS:
            return _METHODS[name]
        raise KeyError(f"Unknown method '{key}'. Registered methods: {', '.join(list_methods())}.")
    config_cls = key if isinstance(key, type) else type(key)
    for spec in _METHODS.values():
        if spec.config_cls is config_cls:
            return spec
    raise KeyError(
        f"{config_cls.__name__} is not a registered specpeft config. Registered: "
        f"{', '.join(s.config_cls.__name__ for s in _METHODS.values())}."
    )


def _register_builtins() -> None:
    for module_name in _BUILTIN_MODULES:
        module = importlib.import_module(f"specpeft.adapters.{module_name}")
        if module.REGISTRATION["name"] not in _METHODS:
            register_method(**module.REGISTRATION)
