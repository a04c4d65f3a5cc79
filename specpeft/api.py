"""Public entry points: wrap a model with an adapter, load a saved adapter, read a config file."""

from __future__ import annotations

import copy
import difflib
import json
import os
from typing import Any, Optional, Union

from torch import nn

from ._peft_compat import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, PeftModel, get_peft_model
from .adapters.config import CONFIG_NAME, find_config_file
from .registry import get_method

ConfigLike = Union[Any, str, os.PathLike]


def load_config(path: str | os.PathLike, subfolder: Optional[str] = None, **hub_options: Any) -> Any:
    """Read an adapter config from an `adapter_config.json` file, the directory holding one, or a Hub repo id
    (`find_config_file`)."""
    file = find_config_file(os.fspath(path), subfolder, **hub_options)
    with open(file) as fh:
        peft_type = json.load(fh).get("peft_type")
    if peft_type is None:
        raise ValueError(f"{file} has no 'peft_type' key; it is not a peft/specpeft adapter config.")
    if _is_stock_peft_type(peft_type) and os.path.basename(file) == CONFIG_NAME:
        return PeftConfig.from_pretrained(os.path.dirname(file))  # a stock peft adapter, e.g. FedSVD's plain LoRA
    return get_method(peft_type).config_cls.from_json_file(file)


def _is_stock_peft_type(peft_type: str) -> bool:
    """True for peft's own methods (LORA, ...) that no specpeft method registered."""
    peft_type = getattr(peft_type, "value", peft_type)  # peft's PeftType enum prints as 'PeftType.LORA'
    try:
        get_method(str(peft_type))
    except KeyError:
        return str(peft_type) in PEFT_TYPE_TO_CONFIG_MAPPING
    return False


def get_adapter_model(model: nn.Module, config: ConfigLike, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """Wrap `model` with a new, trainable adapter.

    Args:
        model: any torch / transformers model.
        config: a specpeft config (e.g. `SVFitConfig(target_modules="all-linear")`), or the path of an
            `adapter_config.json` (or its directory) to train a fresh adapter with saved settings.
        adapter_name: name of the adapter inside the model.
        **kwargs: forwarded to `peft.get_peft_model` (e.g. `autocast_adapter_dtype`).

    Returns:
        A `peft.PeftModel`: `print_trainable_parameters`, `save_pretrained`, `set_adapter`, `disable_adapter()`,
        `merge_and_unload`, ... all work as for LoRA.
    """
    if isinstance(config, (str, os.PathLike)):
        path, config = config, load_config(config)
        if _is_stock_peft_type(config.peft_type):
            raise ValueError(
                f"'{os.fspath(path)}' holds a stock peft {getattr(config.peft_type, 'value', config.peft_type)} config "
                "(FedSVD adapters are saved as plain LoRA, which does not record FedSVD). For a fresh FedSVD adapter "
                f"pass FedSVDConfig(r={getattr(config, 'r', 8)}, target_modules=...); for peft's own method use "
                "peft.get_peft_model."
            )
    spec = get_method(config)
    # A saved adapter's config (read by path, load_config, from_json_file or from_pretrained: it carries the per-layer
    # records a fresh config never has) seeds a fresh, initialized, trainable adapter: peft saved it with
    # inference_mode on, and its records are the old run's init decisions (another model's, perhaps): both dropped.
    if getattr(config, "_loading_checkpoint", False) or getattr(config, "layer_records", None):
        config = copy.copy(config)
        config._loading_checkpoint, config.inference_mode, config.layer_records = False, False, {}
    if spec.builder is not None:
        return spec.builder(model, config, adapter_name, **kwargs)
    try:
        return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "No modules were targeted" in str(exc):
            raise ValueError(_no_match_message(model, config, exc)) from exc
        raise


def load_adapter_model(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
) -> PeftModel:
    """Load an adapter saved by `save_pretrained` onto `model` (a fresh copy of the base model).

    No initializer (SVD, KPSVD) runs: layer shapes come from the saved config, tensors from the checkpoint.

    Args:
        model: the base model the adapter was trained on.
        path: the adapter directory (adapter_config.json + adapter_model.safetensors).
        adapter_name: name to give the adapter.
        is_trainable: keep training it (otherwise the adapter is frozen for inference). A FedSVD adapter is saved as
            a plain LoRA, which records no frozen factor: resume one with
            `specpeft.adapters.fedsvd.load_fedsvd_model`, which keeps A frozen.
        **kwargs: forwarded to `peft.PeftModel.from_pretrained`.
    """
    path = os.fspath(path)
    peft_type = load_config(path, **kwargs).peft_type
    if not _is_stock_peft_type(peft_type):
        get_method(peft_type)  # a specpeft method must be registered (an unknown one is named); peft loads it below
    try:
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise RuntimeError(
                f"The adapter in '{path}' does not fit this model: {exc}\nLoad it onto the base model (and config) "
                "it was trained on."
            ) from exc
        raise


def _no_match_message(model: nn.Module, config: Any, exc: Exception) -> str:
    targets = config.target_modules
    narrowed = [option for option in ("exclude_modules", "layers_to_transform", "layers_pattern")
                if getattr(config, option, None) not in (None, [], "")]
    if narrowed:  # the targets may well match, and these options remove every match: peft's message says which
        return (f"{type(config).__name__}: no module of {type(model).__name__} is left to adapt: target_modules="
                f"{targets!r} together with {' and '.join(narrowed)} selects nothing. peft says: {exc}")
    wanted = [targets] if isinstance(targets, str) else list(targets or [])
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
    hints = sorted({m for t in wanted for m in difflib.get_close_matches(t.rsplit(".", 1)[-1], leaf_names, n=3)})
    supported = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    )
    text = f"{type(config).__name__}.target_modules={targets!r} matched no module of {type(model).__name__}."
    if hints:
        text += f" Close module names: {', '.join(hints)}."
    text += f" Adaptable layers here are named: {', '.join(supported[:20]) or '(none)'}."
    return text + " Fix target_modules (names, suffixes, a regex, or 'all-linear')."
