"""`specpeft merge`: write base + ΔW as a model directory that `transformers.AutoModel*.from_pretrained` loads.

    W'_k = cast_dtype( float32(W_k) + ΔW_k )        for every adapted layer k (ΔW from merge/state_dict.py;
                                                     fp64 arithmetic for an fp64 base)
    W'   = saved tensor                              for modules_to_save (and LoRA bias="all")
    W'   = cast_dtype(W)                             for every other tensor

The output mirrors the base's shard layout and names. Tensors stream one at a time (see checkpoint.py), so peak
memory is about one layer in fp32 plus its ΔW, whatever the shard size. A bitsandbytes checkpoint as base merges
into a dequantized copy (merge onto dequant(quant(W)), the weights the adapter was trained against; never
requantized, anchors/peft.md §3.1), and `quantization_config` is dropped from config.json.

Safety: all output goes to a temporary directory next to `out` and is renamed into place at the end; nothing is
written into the inputs; a non-empty `out` is replaced only with `overwrite=True`; any error removes the
temporary directory, leaving `out` as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..kernels._dispatch import widened
from .checkpoint import DTYPE_NAMES, FLOAT_NAMES, INDEX_NAME, NAME_DTYPES, BaseCheckpoint, SafetensorsWriter
from .output import check_output, staged_output
from .state_dict import LayerDelta, SavedAdapter, load_saved_adapter

DTYPES: dict[str, Optional[torch.dtype]] = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16,
                                            "fp16": torch.float16}
# Weight files of other formats are never copied: they would hold the stale, unmerged weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


@dataclass
class MergeResult:
    """What `merge_adapter` wrote.

    Attributes:
        out: the merged model directory.
        merged: base keys that received a ΔW.
        replaced: base keys replaced by a saved module (modules_to_save).
        dequantized: bitsandbytes weights written dequantized.
        shards: safetensors files written.
        total_bytes: bytes of tensor data written.
        dtype: the `--dtype` option.
        seconds: wall time.
        notes: warnings worth showing to the user.
    """

    out: str
    merged: list[str]
    replaced: list[str]
    dequantized: list[str]
    shards: int
    total_bytes: int
    dtype: str
    seconds: float
    notes: list[str] = field(default_factory=list)


# -- merge ----------------------------------------------------------------------------------------------------------


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Merge a saved adapter into a saved base model, shard by shard, into a new model directory.

    Args:
        base: the base model directory (safetensors, single file or sharded with an index; bnb checkpoints too).
        adapter: the adapter directory (specpeft method or peft LoRA).
        out: the new directory; must not exist, be empty, or `overwrite` must be set.
        dtype: "auto" (keep each tensor's dtype), "fp32", "bf16" or "fp16" (floating tensors only).
        overwrite: replace a non-empty `out`.
        progress: show progress bars over shards and tensors.

    Returns:
        A `MergeResult`.
    """
    start = time.perf_counter()
    base, adapter, out = os.fspath(base), os.fspath(adapter), os.fspath(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")
    check_output(out, overwrite, [base, adapter])
    saved = load_saved_adapter(adapter)
    checkpoint = BaseCheckpoint(base)
    layer_for, override_for, notes = _plan_keys(saved, checkpoint)
    untie = _changes_tied_embeddings(checkpoint, [*layer_for, *override_for])
    out_keys = checkpoint.readable_keys if untie else checkpoint.logical_keys
    if untie:
        notes.append(f"the adapter changes one of the tied word embeddings {checkpoint.tied_embeddings}: both are "
                     "written and tie_word_embeddings is false in config.json (re-tied, one would undo the other).")
    out_dtypes = {key: _output_dtype(checkpoint, key, DTYPES[dtype]) for key in out_keys}
    dequantized = [key for key in out_keys if checkpoint.aliases.get(key, key) in checkpoint.quantized]

    def produce(key: str) -> Tensor:
        tensor = override_for[key]() if key in override_for else checkpoint.read_dense(key)
        if key in layer_for:
            tensor = _merged_weight(layer_for[key], tensor, key)
        return tensor.to(NAME_DTYPES[out_dtypes[key]])

    total = 0
    with staged_output(out, overwrite, [base, adapter]) as staging:
        by_file: dict[str, list[str]] = {}
        for key in out_keys:  # an untied alias goes into the file of the tensor it was stored as
            by_file.setdefault(checkpoint.entries[checkpoint.aliases.get(key, key)].file, []).append(key)
        for name in tqdm(checkpoint.files, desc="merge", unit="shard", disable=not progress):
            keys = by_file.get(name, [])
            layout = [(k, out_dtypes[k], checkpoint.dense_info(k)[1]) for k in keys]
            writer = SafetensorsWriter(os.path.join(staging, name), layout, checkpoint.metadata.get(name, {}))
            try:
                for key in tqdm(writer.order, desc=name, unit="tensor", leave=False, disable=not progress):
                    writer.write(key, produce(key))
            except BaseException:
                writer.abort()
                raise
            writer.close()
            total += writer.total_bytes
        if checkpoint.index is not None:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: checkpoint.entries[checkpoint.aliases.get(k, k)].file for k in sorted(out_keys)}}
            _write_json(os.path.join(staging, INDEX_NAME), index)
        notes += _copy_side_files(checkpoint, staging, DTYPES[dtype], bool(dequantized), untie)
    return MergeResult(os.path.abspath(out), sorted(layer_for), sorted(override_for), dequantized,
                       len(checkpoint.files), total, dtype, time.perf_counter() - start, notes)


_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")  # peft LoRA inits that subtract their start from W


def _plan_keys(saved: SavedAdapter, checkpoint: BaseCheckpoint
               ) -> tuple[dict[str, LayerDelta], dict[str, Callable[[], Tensor]], list[str]]:
    """Map every adapted layer and saved module onto a base key, and check the shapes (before writing anything)."""
    wanted = [layer.weight_key for layer in saved.layers.values()] + list(saved.overrides)
    mapping = checkpoint.match(wanted)
    layer_for, notes = {}, []
    for layer in saved.layers.values():
        key = mapping[layer.weight_key]
        layer.fit_storage(checkpoint, key)
        layer_for[key] = layer
    init = str(saved.config.get("init_lora_weights")).lower()
    if saved.peft_type == "LORA" and init.startswith(_BASE_REWRITING_INITS):
        notes.append(
            f"adapter_config.json has init_lora_weights={saved.config['init_lora_weights']!r}: peft rewrote the base "
            "weights when it created this adapter, so ΔW is relative to that rewritten base. Merge onto the rewritten "
            "base, or first save the adapter with peft's path_initial_model_for_weight_conversion (a plain LoRA "
            "relative to the original base)."
        )
        warnings.warn(notes[-1])
    trained_quantized = [layer.name for layer in saved.layers.values() if layer.quantized]
    if trained_quantized and not checkpoint.quantized:
        notes.append(
            f"{len(trained_quantized)} layers (e.g. '{trained_quantized[0]}') were trained on a bitsandbytes-quantized "
            "base, but this base is full precision: ΔW is added to W, not to the dequant(quant(W)) it was trained "
            "against. For the exact training-time weights, pass the quantized checkpoint (save_pretrained of the "
            "model loaded with BitsAndBytesConfig) as --base."
        )
        warnings.warn(notes[-1])
    override_for = {}
    for key, read in saved.overrides.items():
        target = mapping[key]
        stored = checkpoint.dense_info(target)[1]
        shape = tuple(read().shape)
        if shape != stored:
            raise ValueError(f"Saved module tensor '{key}' in '{saved.path}' has shape {shape}, but base tensor "
                             f"'{target}' has {stored}. Pass the base model the adapter was trained on (if its "
                             "vocabulary was resized for training, save the resized model and pass that).")
        override_for[target] = read
    return layer_for, override_for, notes


def _changes_tied_embeddings(checkpoint: BaseCheckpoint, changed: Sequence[str]) -> bool:
    """The base ties its word embeddings and the adapter changes either of them (a LoRA on lm_head, a trained
    embed_tokens in modules_to_save): during training the other kept its own values, so the export unties them."""
    tied = checkpoint.tied_embeddings
    return tied is not None and bool(set(tied) & set(changed))


def _output_dtype(checkpoint: BaseCheckpoint, key: str, target: Optional[torch.dtype]) -> str:
    name = checkpoint.dense_info(key)[0]
    if name not in NAME_DTYPES:
        raise ValueError(f"Base tensor '{key}' has dtype {name}, which specpeft merge cannot copy.")
    return DTYPE_NAMES[target] if target is not None and name in FLOAT_NAMES else name


def _merged_weight(layer: LayerDelta, stored: Tensor, key: str) -> Tensor:
    """W + ΔW in fp32 (fp64 for an fp64 base) in the stored layout; raises on a non-finite result (a broken
    adapter)."""
    weight = widened(stored)  # a fresh copy unless already fp32/fp64 (then the freshly read tensor itself)
    base = layer.from_storage(weight) if layer.needs_base else None
    weight.add_(layer.to_storage(layer.delta_weight(base)))
    if not math.isfinite(float(weight.sum())):  # any NaN/Inf makes the sum non-finite; no m×n bool temporary
        raise ValueError(f"NaN or Inf in the merged weight '{key}' (layer '{layer.name}'); the adapter is broken "
                         "(check the training run). Nothing was written.")
    return weight


def _copy_side_files(checkpoint: BaseCheckpoint, staging: str, dtype: Optional[torch.dtype],
                     dequantized: bool, untie: bool = False) -> list[str]:
    """Copy config, tokenizer and other non-weight files; record the new dtype / drop quantization / untie the word
    embeddings in config.json."""
    notes, skipped = [], []
    for entry in sorted(os.scandir(checkpoint.directory), key=lambda e: e.name):
        if entry.is_dir():
            skipped.append(entry.name + "/")
        elif entry.name == "config.json" or entry.name == INDEX_NAME or entry.name.endswith(_WEIGHT_SUFFIXES):
            continue
        elif entry.is_file():
            shutil.copy2(entry.path, os.path.join(staging, entry.name))
    if checkpoint.config:
        config = dict(checkpoint.config)
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            config["dtype"] = name
            if "torch_dtype" in config:
                config["torch_dtype"] = name
        if untie:
            config["tie_word_embeddings"] = False
            for sub in config.values():  # a composite model's text config carries the flag too
                if isinstance(sub, dict) and "tie_word_embeddings" in sub:
                    sub["tie_word_embeddings"] = False
        if dequantized and config.pop("quantization_config", None) is not None:
            notes.append("bitsandbytes weights were dequantized; quantization_config was removed from config.json.")
        _write_json(os.path.join(staging, "config.json"), config)
    if skipped:
        notes.append(f"subdirectories not copied: {', '.join(skipped)}")
    return notes


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
