"""The only module that imports peft internals.

peft is our container and file format (design.md §2). Everything we need from it is imported here, checked at
import time, and re-exported, so a peft upgrade that moves a symbol fails in one place with a message that names
the supported range instead of deep inside a method.
"""

from __future__ import annotations

import importlib
from typing import Any

from packaging.version import Version

SUPPORTED_PEFT = (Version("0.21.0"), Version("0.23.0"))  # [min, max)
_RANGE = f"peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}"


def _fail(detail: str) -> ImportError:
    return ImportError(
        f"specpeft needs {_RANGE}; {detail}. Install a supported version with `pip install '{_RANGE}'`."
    )


try:
    import peft
except ImportError as exc:  # pragma: no cover - peft is a hard dependency
    raise _fail("peft is not installed") from exc

PEFT_VERSION = Version(peft.__version__)
if not SUPPORTED_PEFT[0] <= PEFT_VERSION < SUPPORTED_PEFT[1]:
    raise _fail(f"found peft {peft.__version__}")

# (module, attribute) pairs we rely on; each is checked so a rename fails here, loudly.
_REQUIRED: dict[str, tuple[str, str]] = {
    "PeftConfig": ("peft.config", "PeftConfig"),
    "PeftModel": ("peft.peft_model", "PeftModel"),
    "LoraConfig": ("peft.tuners.lora", "LoraConfig"),
    "get_peft_model": ("peft.mapping_func", "get_peft_model"),
    "BaseTuner": ("peft.tuners.tuners_utils", "BaseTuner"),
    "BaseTunerLayer": ("peft.tuners.tuners_utils", "BaseTunerLayer"),
    "check_adapters_to_merge": ("peft.tuners.tuners_utils", "check_adapters_to_merge"),
    "BufferDict": ("peft.tuners._buffer_dict", "BufferDict"),
    "resolve_quantization_backend": ("peft.utils.quantization_utils", "resolve_quantization_backend"),
    "gather_params_ctx": ("peft.utils.integrations", "gather_params_ctx"),
    "PEFT_TYPE_TO_CONFIG_MAPPING": ("peft.mapping", "PEFT_TYPE_TO_CONFIG_MAPPING"),
    "PEFT_TYPE_TO_TUNER_MAPPING": ("peft.mapping", "PEFT_TYPE_TO_TUNER_MAPPING"),
    "PEFT_TYPE_TO_PREFIX_MAPPING": ("peft.mapping", "PEFT_TYPE_TO_PREFIX_MAPPING"),
    "get_peft_model_state_dict": ("peft.utils.save_and_load", "get_peft_model_state_dict"),
    "set_peft_model_state_dict": ("peft.utils.save_and_load", "set_peft_model_state_dict"),
}


def _resolve(name: str) -> Any:
    module_name, attr = _REQUIRED[name]
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise _fail(f"peft {peft.__version__} has no `{module_name}.{attr}`") from exc


PeftConfig = _resolve("PeftConfig")
PeftModel = _resolve("PeftModel")
LoraConfig = _resolve("LoraConfig")
get_peft_model = _resolve("get_peft_model")
BaseTuner = _resolve("BaseTuner")
BaseTunerLayer = _resolve("BaseTunerLayer")
check_adapters_to_merge = _resolve("check_adapters_to_merge")
BufferDict = _resolve("BufferDict")
_peft_quantization_backend = _resolve("resolve_quantization_backend")
gather_params_ctx = _resolve("gather_params_ctx")
PEFT_TYPE_TO_CONFIG_MAPPING = _resolve("PEFT_TYPE_TO_CONFIG_MAPPING")
PEFT_TYPE_TO_TUNER_MAPPING = _resolve("PEFT_TYPE_TO_TUNER_MAPPING")
PEFT_TYPE_TO_PREFIX_MAPPING = _resolve("PEFT_TYPE_TO_PREFIX_MAPPING")
get_peft_model_state_dict = _resolve("get_peft_model_state_dict")
set_peft_model_state_dict = _resolve("set_peft_model_state_dict")

for _method in ("_create_and_replace", "_get_adapter_state_dict", "_remap_adapter_state_dict_for_load"):
    if not hasattr(BaseTuner, _method):
        raise _fail(f"peft {peft.__version__} BaseTuner lacks `{_method}`")
# PeftModel enters `base_model.<this>(*args, **kwargs)` around every forward and generate when the tuner defines it
PEFT_FORWARD_HOOK = "_enable_peft_forward_hooks"
if not hasattr(PeftModel, PEFT_FORWARD_HOOK):
    raise _fail(f"peft {peft.__version__} PeftModel lacks `{PEFT_FORWARD_HOOK}`")


def register_peft_type(peft_type: str, config_cls: type, tuner_cls: type, prefix: str) -> None:
    """Write one method into peft's mapping dicts (peft's own `register_peft_method` rejects non-PeftType names)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


class _PackedAwareBackend:
    """peft's quantization backend of one layer, whose weight reads also see bitsandbytes' CPU inference layout.

    bitsandbytes ≥ 0.49 repacks a 4-bit weight in place on its first eval, no-grad forward on a CPU with AVX512-bf16
    (`quant_state.packing_format_for_cpu`); peft's dequantization does not know that layout and returns wrong values.
    Such a weight is read here as the packed forward uses it, on a copy of its quant state, so the module keeps its
    fast layout. Everything else is peft's backend.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        backend = self.__dict__.get("_backend")  # absent while copy/pickle rebuild the object
        if backend is None:
            raise AttributeError(name)
        return getattr(backend, name)

    def get_base_weight(self, base_layer: Any) -> Any:
        weight = base_layer.weight
        state = getattr(weight, "quant_state", None)
        if not getattr(state, "packing_format_for_cpu", False):
            return self._backend.get_base_weight(base_layer)
        import copy

        import bitsandbytes.functional as bnbf

        # The inverse unpacks the data and rewrites the state's fields: on a copy, so the module keeps its layout. Its
        # absmax is the packed forward's, bf16 in (blocks per row, rows) order: used as is, in row-major block order,
        # not re-quantized (the inverse would for nested statistics, and leaves the transposed order otherwise).
        packed_absmax = state.absmax
        state = copy.copy(state)
        state.original_nested = False
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        state.absmax = packed_absmax.T.reshape(-1).float()  # (K/block, N) -> (N, K/block) -> blocks in storage order
        return bnbf.dequantize_4bit(data, state)


def resolve_quantization_backend(base_layer: Any) -> Any:
    """peft's backend for a quantized base layer (None for a plain one), reading bitsandbytes' CPU-packed 4-bit
    weights correctly (`_PackedAwareBackend`)."""
    backend = _peft_quantization_backend(base_layer)
    return None if backend is None else _PackedAwareBackend(backend)


def bnb_layer_types() -> tuple[type, ...]:
    """bitsandbytes quantized Linear classes, or () when bitsandbytes is unavailable."""
    try:
        import bitsandbytes as bnb
    except Exception:  # bnb raises assorted errors on unsupported platforms
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


__all__ = [name for name in _REQUIRED] + [
    "PEFT_FORWARD_HOOK", "PEFT_VERSION", "SUPPORTED_PEFT", "register_peft_type", "bnb_layer_types",
]
