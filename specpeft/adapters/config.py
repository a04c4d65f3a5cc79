"""The config base every specpeft method extends: peft's JSON format, our validation, per-layer records."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from .._peft_compat import PeftConfig

CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


_HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def find_config_file(path: str, subfolder: Optional[str] = None, **hub_options: Any) -> str:
    """The `adapter_config.json` of a saved adapter: a local directory (or the file itself), else a Hugging Face Hub
    repo id, fetched (or found in the local cache, offline) by `huggingface_hub.hf_hub_download` as peft does.

    Raises:
        FileNotFoundError: neither exists, naming both places looked at.
    """
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isfile(local):
        return local
    if os.path.isfile(os.path.join(local, CONFIG_NAME)):
        return os.path.join(local, CONFIG_NAME)
    if os.path.isdir(local):
        raise FileNotFoundError(f"No {CONFIG_NAME} in '{local}'. Pass the directory written by save_pretrained.")
    from huggingface_hub import hf_hub_download

    try:
        options = {key: value for key, value in hub_options.items() if key in _HUB_OPTIONS}
        return hf_hub_download(path, CONFIG_NAME, subfolder=subfolder, **options)
    except Exception as exc:  # an invalid repo id, no network, not in the cache: one message for all
        raise FileNotFoundError(
            f"No adapter at '{local}': not a local directory, and the Hugging Face Hub repo '{path}' gave no "
            f"{CONFIG_NAME} ({type(exc).__name__}: {exc}). Pass the directory written by save_pretrained or a repo id."
        ) from exc


class MethodType(str):
    """A `peft_type` value for a specpeft method.

    peft's `PeftType` enum is closed, so methods use their own type. It is a plain `str` (JSON-serializable, equal
    to the string loaded from an adapter file) with the Enum-like `.value` / `.name` that transformers reads.
    """

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return str(self)


@dataclass
class SpecPeftConfig(PeftConfig):
    """Fields shared by every specpeft method; targets are matched by peft exactly as for LoRA.

    Attributes:
        target_modules: module names or suffixes, a regex (full match), or "all-linear".
        exclude_modules: names or a regex never adapted.
        layers_to_transform: layer indices to adapt (with `layers_pattern`).
        layers_pattern: the name of the layer list (e.g. "layers") that `layers_to_transform` indexes.
        modules_to_save: modules trained fully and saved with the adapter (e.g. a classifier head).
        target_parameters: not supported by specpeft methods; must stay None.
        layer_records: per-layer decisions made at init (ranks, shapes, seeds), keyed by module name. Filled by
            specpeft and saved, so loading rebuilds every layer without re-running an SVD.
        format_version: adapter file layout version, for migrations.
        kernel_backend: fused-kernel implementation for this model's adapters: "auto" (Triton on CUDA tensors when
            triton imports and the method's Triton path trained faster on a GPU, else the torch reference; the
            `SPECPEFT_KERNELS` environment variable can force either), "triton" or "torch" (forced, overriding the
            environment variable).
    """

    METHOD: ClassVar[str] = ""

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    target_parameters: Optional[list[str]] = None
    layer_records: dict[str, dict] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.METHOD:
            raise TypeError(f"{type(self).__name__} must set the class attribute METHOD (e.g. 'SVFIT').")
        self.peft_type = MethodType(self.METHOD)
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
        self._coerce_nested()
        self._validate_types()
        if self.target_parameters:
            raise ValueError(
                f"{type(self).__name__}.target_parameters={self.target_parameters!r}: specpeft methods adapt modules, "
                "not bare parameters. Use `target_modules` instead."
            )
        if self.format_version > FORMAT_VERSION:
            warnings.warn(
                f"{type(self).__name__}: adapter format_version {self.format_version} is newer than this specpeft "
                f"understands ({FORMAT_VERSION}); upgrade specpeft if loading fails."
            )
        self.validate()

    def validate(self) -> None:
        """Method-specific value checks; raise ValueError naming the field and the fix."""

    # -- JSON ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> SpecPeftConfig:  # type: ignore[override]
        """Read a peft-style `adapter_config.json`; keys unknown to this version warn and are dropped."""
        with open(path_json_file) as fh:
            data = json.load(fh)
        data.pop("runtime_config", None)
        expected = data.get("peft_type")
        if expected is not None and cls.METHOD and expected != cls.METHOD:
            raise ValueError(
                f"{path_json_file} holds a '{expected}' adapter, not {cls.METHOD}; load it with "
                "`specpeft.load_adapter_model` or the matching config class."
            )
        return cls._from_dict(data, source=path_json_file)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Read `adapter_config.json` from a local directory or a Hub repo id (`find_config_file`; also used by
        `PeftModel.from_pretrained`).

        The result describes a saved checkpoint: adapters injected from it skip their initializer (the checkpoint
        supplies the tensors). `get_adapter_model` lifts that mark and initializes normally; to add a fresh adapter
        with `PeftModel.add_adapter`, read the settings with `from_json_file` instead.
        """
        config = cls.from_json_file(find_config_file(pretrained_model_name_or_path, subfolder, **kwargs))
        # Reached through PeftModel.from_pretrained / load_adapter: the checkpoint supplies the tensors, so
        # initializers must not run (see bridge.AdapterLayer.update_layer).
        config._loading_checkpoint = True
        return config

    @classmethod
    def _from_dict(cls, data: dict[str, Any], source: str = "config") -> SpecPeftConfig:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"{source}: keys {unknown} are unknown to {cls.__name__} (written by a newer version?) and are "
                "ignored. Upgrade specpeft if the adapter does not load as expected."
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    # -- validation ---------------------------------------------------------------------------------------------

    def _own_fields(self) -> list[dataclasses.Field]:
        peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
        return [f for f in dataclasses.fields(self) if f.name not in peft_fields and f.name != "peft_type"]

    def _coerce_nested(self) -> None:
        """JSON gives nested dataclass options (e.g. `svd`) as dicts; rebuild them."""
        hints = typing.get_type_hints(type(self))
        for f in self._own_fields():
            value = getattr(self, f.name)
            target = hints[f.name]
            if isinstance(value, dict) and dataclasses.is_dataclass(target):
                setattr(self, f.name, target(**value))

    def _validate_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in self._own_fields():
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise TypeError(
                    f"{type(self).__name__}.{f.name}={value!r} has type {type(value).__name__}; "
                    f"expected {_describe(hints[f.name])}."
                )


def _matches(value: Any, hint: Any) -> bool:
    """A small runtime check for the JSON-shaped types used in configs."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "")
    return text.replace("NoneType", "None")
