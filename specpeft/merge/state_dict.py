"""ΔW of every adapted layer from a saved adapter directory alone: pure functions over state dicts, no model.

    specpeft method:  ΔW_k = adapter_cls.create(geometry_k, config, None, record_k) ← tensors_k, then .delta_weight()
    peft LoRA:        ΔW_k = s_k · B_k A_k,   s_k = α_k / r_k  (α_k / √r_k with rsLoRA)
    peft DoRA:        W'_k = m_k ⊙ (W_k + s_k B_k A_k) / ‖W_k + s_k B_k A_k‖_row,   ΔW_k = W'_k − W_k   (needs W_k)

Every saved specpeft config holds `layer_records[k]` = the method's record plus `"layer"`, the layer geometry; the
layer's tensors are the file keys `base_model.model.{k}.{method}_adapter.{tensor}`. FedSVD (and any peft LoRA) is
saved as plain LoRA files and handled by the LoRA rule. Tensors are read lazily, one layer at a time, so a large
adapter (e.g. SVFit at 99 % energy) never sits in memory whole.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .._peft_compat import BufferDict
from ..adapters.geometry import LayerGeometry
from ..registry import get_method
from .checkpoint import BaseCheckpoint, TensorFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector|lora_B\.bias)$"
)
# LoRA options whose forward is not W + s·B A on the whole input, so no merged weight reproduces it.
_LORA_UNMERGEABLE = ("use_qalora", "use_bdlora", "alora_invocation_tokens", "layer_replication", "target_parameters",
                     "trainable_token_indices")


@dataclass
class LayerDelta:
    """One adapted layer of a saved adapter, and how to compute its ΔW.

    Attributes:
        name: module name in the model the adapter was trained on (e.g. "model.layers.0.self_attn.q_proj").
        kind: "linear", "conv1d", "conv2d", "conv3d" or "embedding".
        weight_shape: normalized weight shape `(out, in/groups, *kernel)`; embeddings `(num_embeddings, dim)`.
        fan_in_fan_out: the base stores the weight transposed, `(in, out)` (transformers Conv1D).
        groups: conv groups of the base layer.
        dilation: conv dilation (empty for linear).
        standard_forward: the base op is exactly `F.linear` / `F.convNd` with zero padding.
        quantized: the adapter was trained on a bitsandbytes-quantized base.
        needs_base: ΔW depends on the base weight (DoRA).
        layout_known: False for LoRA files, whose `fan_in_fan_out` is settled against the base (`fit_storage`).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    fan_in_fan_out: bool = False
    groups: int = 1
    dilation: tuple[int, ...] = ()
    standard_forward: bool = True
    quantized: bool = False
    needs_base: bool = False
    layout_known: bool = True
    _compute: Callable[[Optional[Tensor]], Tensor] = field(default=None, repr=False, compare=False)  # type: ignore
    _count: Callable[[], int] = field(default=None, repr=False, compare=False)  # type: ignore

    @property
    def weight_key(self) -> str:
        """The weight's state-dict key in the training model."""
        return f"{self.name}.weight"

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """Shape of the weight as the base layer stores it (transposed for Conv1D)."""
        return self.weight_shape[::-1] if self.fan_in_fan_out else self.weight_shape

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """ΔW viewed as a matrix: `(out, in/groups·prod(kernel))`; embeddings `(num_embeddings, dim)`."""
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    def delta_weight(self, base_weight: Optional[Tensor] = None) -> Tensor:
        """ΔW in normalized layout, fp32. `base_weight` (normalized layout) is needed only when `needs_base`."""
        if self.needs_base and base_weight is None:
            raise ValueError(f"Layer '{self.name}': its ΔW depends on the base weight (DoRA); pass the base model.")
        with torch.no_grad():
            delta = self._compute(None if base_weight is None else base_weight.float())
        if tuple(delta.shape) != self.weight_shape:
            raise ValueError(f"Layer '{self.name}': ΔW has shape {tuple(delta.shape)}, expected {self.weight_shape}.")
        return delta

    def fit_storage(self, checkpoint: BaseCheckpoint, key: str) -> None:
        """Check the base weight `key`'s stored shape; settle a LoRA layer's layout against the base.

        A LoRA file records `fan_in_fan_out` once per adapter, but peft flips it per layer (Conv1D vs Linear): the
        base's architecture decides (`BaseCheckpoint.stores_transposed`), else a non-square weight's stored shape,
        else (a square weight of an architecture that cannot be built) the file's flag.
        """
        shape = tuple(checkpoint.dense_info(key)[1])
        if not self.layout_known and self.kind == "linear":
            transposed = checkpoint.stores_transposed(key)
            if transposed is not None:
                self.fan_in_fan_out = transposed
            elif shape == self.weight_shape[::-1] != self.weight_shape:
                self.fan_in_fan_out = True
            elif shape == self.weight_shape != self.weight_shape[::-1]:
                self.fan_in_fan_out = False
        if shape != self.storage_shape:
            raise ValueError(f"Base tensor '{key}' has shape {shape}, but the adapter of layer '{self.name}' expects "
                             f"{self.storage_shape}. Pass the base model the adapter was trained on.")

    def to_storage(self, weight: Tensor) -> Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def from_storage(self, weight: Tensor) -> Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def num_trainable(self) -> int:
        """Trainable parameters of this layer's adapter (LoRA: every factor in the file)."""
        return self._count()


@dataclass
class SavedAdapter:
    """A saved adapter directory, parsed.

    Attributes:
        path: the directory.
        config: the raw `adapter_config.json`.
        peft_type: "SVFIT", "TERA", ..., or "LORA".
        layers: module name → its `LayerDelta`, in file order.
        overrides: full tensors that replace base tensors (modules_to_save, LoRA `bias="all"`, embeddings saved
            with `save_embedding_layers`), keyed by their state-dict key in the training model ("lm_head.weight");
            an adapted layer's ΔW is added on top of its override.
        files: the adapter's tensor file.
    """

    path: str
    config: dict[str, Any]
    peft_type: str
    layers: dict[str, LayerDelta]
    overrides: dict[str, Callable[[], Tensor]]
    files: TensorFile

    @property
    def method(self) -> str:
        return self.peft_type.lower()

    @property
    def target_modules(self) -> Any:
        return self.config.get("target_modules")

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])


def load_saved_adapter(path: str | os.PathLike) -> SavedAdapter:
    """Parse an adapter directory (adapter_config.json + adapter_model.safetensors) without building a model.

    Raises:
        FileNotFoundError: the config or the tensor file is missing.
        ValueError: a key that belongs to no adapted layer, a tensor that does not fit its layer record, or an
            option (LoRA variant) whose effect no merged weight can reproduce.
    """
    path = os.fspath(path)
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        # save_pretrained of several adapters writes each non-default one into a subfolder named after it
        named = sorted(name for name in (os.listdir(path) if os.path.isdir(path) else [])
                       if os.path.isfile(os.path.join(path, name, ADAPTER_CONFIG)))
        hint = f" It holds adapters in subfolders: {', '.join(named)}; pass one of those." if named else ""
        raise FileNotFoundError(
            f"No {ADAPTER_CONFIG} in '{path}': pass the directory written by save_pretrained.{hint}")
    try:
        with open(config_file) as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"'{config_file}' is not valid JSON ({exc}); the file is corrupted.") from exc
    weights = next((os.path.join(path, n) for n in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise FileNotFoundError(f"No {' or '.join(ADAPTER_WEIGHTS)} in '{path}'.")
    files = TensorFile(weights)
    peft_type = str(config.get("peft_type", ""))
    if not peft_type:
        raise ValueError(f"'{config_file}' has no 'peft_type'; it is not a peft/specpeft adapter config.")
    if peft_type == "LORA":
        layers, overrides = _parse_lora(config, files)
    else:
        layers, overrides = _parse_method(config_file, peft_type, files)
    if not layers:
        raise ValueError(f"The adapter in '{path}' adapts no layer (no adapter tensors in '{weights}').")
    return SavedAdapter(path, config, peft_type, layers, overrides, files)


# -- specpeft methods -------------------------------------------------------------------------------------------


def _base_key(key: str) -> Optional[str]:
    """A saved full tensor's key in base-model naming, or None for a copy of the untrained base tensor.

    peft saves a wrapped layer's own weight (save_embedding_layers, bias="all") under `<layer>.base_layer.<leaf>`;
    for a resized embedding in `modules_to_save` it writes `<layer>.modules_to_save.<leaf>` (the trained copy, also
    saved as `<layer>.<leaf>`) and `<layer>.original_module.<leaf>` (the base's, skipped).
    """
    key = key[len(MODEL_PREFIX):]
    if ".original_module." in key:
        return None
    return key.replace(".base_layer.", ".").replace(".modules_to_save.", ".")


def _add_override(overrides: dict[str, Callable[[], Tensor]], files: TensorFile, key: str) -> None:
    base_key = _base_key(key)
    if base_key is not None:
        overrides[base_key] = _reader(files, key)


def _parse_method(config_file: str, peft_type: str, files: TensorFile) -> tuple[dict[str, LayerDelta], dict]:
    spec = get_method(peft_type)
    if spec.adapter_cls is None:
        raise ValueError(f"{config_file}: method {peft_type} has no per-layer adapter class to rebuild ΔW from.")
    config = spec.config_cls.from_json_file(config_file)
    prefix = f"{spec.name}_"
    records: dict[str, dict] = config.layer_records
    layer_keys: dict[str, list[str]] = {name: [] for name in records}
    shared_keys, overrides, shared_head = [], {}, f"base_model.{prefix}shared."
    for key in files.keys:
        module, sep, _ = key.partition(f".{prefix}adapter.")
        if sep and module.startswith(MODEL_PREFIX):
            name = module[len(MODEL_PREFIX):]
            if name not in layer_keys:
                raise ValueError(f"{files.path}: tensor '{key}' has no layer record for '{name}' in {config_file}.")
            layer_keys[name].append(key)
        elif key.startswith(shared_head):
            shared_keys.append(key)
        elif key.startswith(MODEL_PREFIX):
            _add_override(overrides, files, key)
        else:
            raise ValueError(f"{files.path}: key '{key}' is neither an adapter tensor nor a saved module.")
    shared = None
    if spec.adapter_cls.uses_shared_state:
        shared = BufferDict(persistent=False)  # saved shared tensors win; missing ones are regenerated by create()
        for key in shared_keys:
            shared[key[len(shared_head):]] = files.get(key)
    elif shared_keys:
        raise ValueError(f"{files.path}: shared tensors {shared_keys[:3]} but {peft_type} keeps no shared state.")
    layers = {}
    for name, record in records.items():
        if "layer" not in record:
            raise ValueError(f"{config_file}: layer_records['{name}'] has no 'layer' geometry (saved by an older "
                             "specpeft); load the adapter on its base model and save it again.")
        if not layer_keys[name]:
            raise ValueError(f"{files.path}: no tensors for layer '{name}' (expected '{MODEL_PREFIX}{name}."
                             f"{prefix}adapter.*'); the file does not match {config_file}.")
        geometry = LayerGeometry.from_record(record["layer"])
        build = _method_builder(spec, config, name, record, geometry, files, layer_keys[name], shared)
        layers[name] = LayerDelta(
            name, geometry.kind, geometry.weight_shape, geometry.fan_in_fan_out, geometry.groups, geometry.dilation,
            geometry.standard_forward, geometry.quantized, False,
            _compute=lambda _base, build=build: build().delta_weight().float(),
            _count=lambda build=build: sum(p.numel() for p in build().parameters() if p.requires_grad),
        )
    return layers, overrides


def _method_builder(spec: Any, config: Any, name: str, record: dict, geometry: LayerGeometry, files: TensorFile,
                    keys: list[str], shared: Optional[BufferDict]) -> Callable[[], Any]:
    """A function building this layer's adapter from its record (no init runs) and loading its saved tensors."""
    head = f"{MODEL_PREFIX}{name}.{spec.name}_adapter."

    def build() -> Any:
        extra = {"shared": shared} if spec.adapter_cls.uses_shared_state else {}
        adapter = spec.adapter_cls.create(geometry, config, None, record, name=name, **extra)
        state = {key[len(head):]: files.get(key) for key in keys}
        expected = adapter.state_dict()
        for key, tensor in state.items():
            if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
                raise ValueError(f"{files.path}: '{head}{key}' has shape {tuple(tensor.shape)}, but the layer "
                                 f"record of '{name}' gives {tuple(expected[key].shape)}.")
        result = adapter.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{files.path}: layer '{name}' is missing {result.missing_keys} / has unexpected "
                             f"{result.unexpected_keys} tensors for {type(adapter).__name__}.")
        return adapter.eval()

    return build


# -- peft LoRA --------------------------------------------------------------------------------------------------


def _parse_lora(config: dict, files: TensorFile) -> tuple[dict[str, LayerDelta], dict]:
    for option in _LORA_UNMERGEABLE:
        if config.get(option):
            raise ValueError(f"LoRA option {option}={config[option]!r} changes the forward beyond W + s·B A; such "
                             "an adapter has no merged weight or plain-LoRA equivalent.")
    if config.get("lora_bias"):
        raise ValueError("LoRA with lora_bias=True (a trained bias on lora_B) is not supported by specpeft merge.")
    parts: dict[str, dict[str, str]] = {}
    overrides = {}
    for key in files.keys:
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = key
        elif key.startswith(MODEL_PREFIX) and ".lora_" not in key:
            # a full base weight saved with the adapter (save_embedding_layers): it replaces the base tensor
            _add_override(overrides, files, key)
        else:
            raise ValueError(f"{files.path}: key '{key}' is not a LoRA factor this exporter understands.")
    return {name: _lora_layer(name, found, config, files) for name, found in parts.items()}, overrides


def _lora_layer(name: str, keys: dict[str, str], config: dict, files: TensorFile) -> LayerDelta:
    embedding = "lora_embedding_A" in keys
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    if a_key not in keys or b_key not in keys:
        raise ValueError(f"{files.path}: layer '{name}' lacks '{a_key}' or '{b_key}' (found {sorted(keys)}).")
    a_shape, b_shape = files.shape(keys[a_key]), files.shape(keys[b_key])
    magnitude = keys.get("lora_magnitude_vector")
    rank = a_shape[0]
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if embedding:  # A (r, num_embeddings), B (dim, r): ΔW = s (B A)ᵀ, stored (num_embeddings, dim)
        if magnitude:
            raise ValueError(f"{files.path}: DoRA on embedding '{name}' is not supported by specpeft merge.")
        kind, shape, groups, fan = "embedding", (a_shape[1], b_shape[0]), 1, False
    elif len(a_shape) == 2:
        kind, shape, groups, fan = "linear", (b_shape[0], a_shape[1]), 1, bool(config.get("fan_in_fan_out"))
    else:  # conv: A (r, in, *k), B (out, r/groups, 1, …)
        groups = rank // b_shape[1]
        kind, shape, fan = f"conv{len(a_shape) - 2}d", (b_shape[0], a_shape[1] // groups, *a_shape[2:]), False

    def compute(base: Optional[Tensor]) -> Tensor:
        A, B = files.get(keys[a_key]).float(), files.get(keys[b_key]).float()
        if embedding:
            return (B @ A).T * scale  # (dim, r)·(r, num) -> (num, dim)
        out_g, rank_g = B.shape[0] // groups, rank // groups
        # group g: B_g (out/g, r/g) · A_g (r/g, in·k) -> (out/g, in·k); B's 1×1 conv is grouped, A's is not
        dense = torch.cat([B[g * out_g:(g + 1) * out_g].flatten(1) @ A[g * rank_g:(g + 1) * rank_g].flatten(1)
                           for g in range(groups)]).reshape(B.shape[0], *A.shape[1:]) * scale  # (out, in, *k)
        delta = dense if groups == 1 else _grouped_blocks(dense, groups, name)
        if magnitude is None:
            return delta
        updated = base + delta
        norm = updated.flatten(1).norm(dim=1)  # per output channel, over (in, *k)
        factor = files.get(magnitude).float().reshape(-1) / norm  # (out,)
        return factor.reshape(-1, *([1] * (updated.dim() - 1))) * updated - base

    def count() -> int:
        extra = math.prod(files.shape(magnitude)) if magnitude else 0
        return math.prod(a_shape) + math.prod(b_shape) + extra

    return LayerDelta(name, kind, shape, fan, groups, (), True, False, magnitude is not None, layout_known=False,
                      _compute=compute, _count=count)


def _grouped_blocks(dense: Tensor, groups: int, name: str) -> Tensor:
    """The per-group diagonal blocks `(out, in/groups, *k)` of a dense `(out, in, *k)` update of a grouped conv.

    peft's grouped LoRA conv reads every input channel in lora_A; it merges into the grouped base weight only if the
    update is zero outside each group's own channels (true for `specpeft to-lora` output).
    """
    out, width = dense.shape[0] // groups, dense.shape[1] // groups
    blocks = [dense[g * out:(g + 1) * out, g * width:(g + 1) * width] for g in range(groups)]
    delta = torch.cat(blocks, dim=0)  # groups × (out/g, in/g, *k) -> (out, in/g, *k)
    off_block = dense.pow(2).sum() - delta.pow(2).sum()
    if off_block > 1e-10 * dense.pow(2).sum() + 1e-30:
        raise ValueError(f"LoRA on grouped conv '{name}' updates channels across groups (peft: 'Merging is not "
                         "supported' for groups > 1), so no grouped weight equals it; exclude this layer.")
    return delta


def pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the first key matching `(.*\\.)?key$` against the module name wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _reader(files: TensorFile, key: str) -> Callable[[], Tensor]:
    return lambda: files.get(key)
