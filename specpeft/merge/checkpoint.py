"""File access for export: lazy tensor files, a base model's shards, a streaming safetensors writer.

Memory is bounded by one tensor, not one shard: a tensor is read by reopening its shard (a kept-open handle keeps
every page it touched resident), and the writer emits the header first (shapes and dtypes are known from the
input headers) and then each tensor's bytes as soon as it is ready.

bitsandbytes checkpoints (saved from a model loaded with `BitsAndBytesConfig`) are read dequantized: a 4-bit weight
`X.weight` with its `X.weight.absmax / quant_map / quant_state.*` companions, an 8-bit `X.weight` (int8) with `X.SCB`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .key_matching import match_keys, meta_model, saved_names, stores_transposed, tied_embedding_keys

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
NAME_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16")


class TensorFile:
    """Lazy, read-only access to the tensors of one `.safetensors` (or torch `.bin`) file.

    Each `get` reopens the file, so at most one tensor's pages are resident (a kept-open safetensors handle keeps
    every page it touched mapped).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._bin: Optional[dict[str, Tensor]] = None
        try:
            if path.endswith(".safetensors"):
                with safe_open(path, framework="pt") as handle:
                    self.keys: list[str] = list(handle.keys())
                    self.metadata: dict[str, str] = handle.metadata() or {}
            else:
                self._bin = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self.keys, self.metadata = list(self._bin), {}
        except Exception as exc:
            raise ValueError(f"Cannot read '{path}': {exc}. The file is corrupted or truncated; re-save it.") from exc

    def get(self, key: str) -> Tensor:
        if self._bin is not None:
            return self._bin[key]
        try:
            with safe_open(self.path, framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as exc:
            raise ValueError(f"Cannot read tensor '{key}' from '{self.path}': {exc}") from exc

    def shape(self, key: str) -> tuple[int, ...]:
        if self._bin is not None:
            return tuple(self._bin[key].shape)
        with safe_open(self.path, framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what the header says about it."""

    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class QuantizedWeight:
    """A bitsandbytes weight stored as a packed tensor plus companions; read back dequantized."""

    key: str
    bits: int
    companions: tuple[str, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]


class BaseCheckpoint:
    """A model directory's weights: `model.safetensors` or `model.safetensors.index.json` + shards.

    Opening validates everything that can be checked without reading the data: the index parses, every shard it
    names exists and has a readable header, and every key of the index is in its shard.

    Raises:
        FileNotFoundError: no safetensors weights, or a shard named by the index is missing.
        ValueError: a corrupted index, shard header or quantization companion, naming the file (and key).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"Base model directory '{self.directory}' does not exist.")
        index_path = os.path.join(self.directory, INDEX_NAME)
        self.index: Optional[dict[str, Any]] = None
        if os.path.isfile(index_path):
            try:
                with open(index_path) as fh:
                    self.index = json.load(fh)
                weight_map: dict[str, str] = self.index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"'{index_path}' is not a valid safetensors index ({exc!r}); re-save the model.") from exc
            self.files = list(dict.fromkeys(weight_map.values()))
        elif os.path.isfile(os.path.join(self.directory, SINGLE_NAME)):
            weight_map, self.files = {}, [SINGLE_NAME]
        else:
            present = ", ".join(sorted(os.listdir(self.directory))[:8]) or "nothing"
            raise FileNotFoundError(
                f"No {SINGLE_NAME} or {INDEX_NAME} in '{self.directory}' (found: {present}). Save the base model with "
                "`save_pretrained` (safetensors is the default format)."
            )
        self.entries: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for name in self.files:
            self._read_header(name, [k for k, f in weight_map.items() if f == name])
        self.config = self._read_config()
        self.quantized = self._find_quantized()
        companions = {c for q in self.quantized.values() for c in q.companions}
        self.logical_keys = [k for k in self.entries if k not in companions]

    # -- reading ------------------------------------------------------------------------------------------------

    def _read_header(self, name: str, index_keys: Sequence[str]) -> None:
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            example = f" (it holds '{index_keys[0]}')" if index_keys else ""
            raise FileNotFoundError(f"Shard '{path}' named by {INDEX_NAME} is missing{example}.")
        try:
            with safe_open(path, framework="pt") as handle:
                self.metadata[name] = handle.metadata() or {}
                for key in handle.keys():
                    view = handle.get_slice(key)
                    self.entries[key] = TensorInfo(name, view.get_dtype(), tuple(view.get_shape()))
        except Exception as exc:
            raise ValueError(f"Cannot read shard '{path}': {exc}. The file is corrupted or truncated.") from exc
        for key in index_keys:
            if self.entries.get(key, TensorInfo("", "", ())).file != name:
                raise ValueError(f"{INDEX_NAME} maps '{key}' to '{path}', but that shard does not hold it.")

    def _read_config(self) -> dict[str, Any]:
        path = os.path.join(self.directory, "config.json")
        if not os.path.isfile(path):
            return {}
        try:
            with open(path) as fh:
                return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"'{path}' is not valid JSON ({exc}).") from exc

    def read(self, key: str) -> Tensor:
        """One stored tensor as saved (packed for bnb weights); reopens its shard."""
        info = self.entries[key]
        path = os.path.join(self.directory, info.file)
        try:
            with safe_open(path, framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as exc:
            raise ValueError(f"Cannot read tensor '{key}' from '{path}': {exc}. The file is corrupted.") from exc

    @functools.cached_property
    def architecture(self) -> Optional[nn.Module]:
        """config.json's model built on the meta device (`key_matching.meta_model`), or None."""
        return meta_model(self.directory, self.config)

    @functools.cached_property
    def tied_embeddings(self) -> Optional[tuple[str, str]]:
        """(output, input) word-embedding keys that config.json ties, or None (`tied_embedding_keys`)."""
        return tied_embedding_keys(self.architecture)

    def stores_transposed(self, key: str) -> Optional[bool]:
        """Whether the architecture stores weight `key` as (in, out) (transformers' Conv1D); None when unknown."""
        return stores_transposed(self.architecture, key)

    @functools.cached_property
    def aliases(self) -> dict[str, str]:
        """{tied key the checkpoint does not store: the stored key it is read as} (e.g. GPT-2's lm_head.weight →
        transformer.wte.weight): transformers saves a tied pair once and re-ties it on load."""
        tied = self.tied_embeddings
        if tied is None or tied[0] in self.entries or tied[1] not in self.entries:
            return {}
        return {tied[0]: tied[1]}

    @property
    def readable_keys(self) -> list[str]:
        """`logical_keys` and the tied keys read through `aliases`."""
        return self.logical_keys + list(self.aliases)

    def match(self, wanted: Sequence[str]) -> dict[str, str]:
        """`match_keys` of the training model's keys onto `readable_keys`; the error says when a missing config.json
        may be why (a tied output embedding, stored once under the input embedding's key, is found through it)."""
        hint = "" if self.config else (
            f" '{self.directory}' has no config.json: if the missing key is an output embedding tied to the input "
            "embedding (stored once, under the input embedding's key), copy the model's config.json next to its "
            "weights so the tie can be found.")
        try:
            return match_keys(wanted, self.readable_keys, f"the base checkpoint '{self.directory}'", hint)
        except ValueError:
            renamed = self._match_through_architecture(wanted)
            if renamed is None:
                raise
            return renamed

    def _match_through_architecture(self, wanted: Sequence[str]) -> Optional[dict[str, str]]:
        """transformers ≥ 5 renames some architectures' weights on load and back on save (ViT, the Llava family):
        match the training model's keys onto the architecture's in-memory names, then name each as it is saved."""
        model = self.architecture
        if model is None:
            return None
        try:
            onto_model = match_keys(wanted, model.state_dict().keys())
        except ValueError:
            return None
        saved = saved_names(model, onto_model.values())
        mapping = {key: saved[onto_model[key]] for key in wanted}
        readable = set(self.readable_keys)
        return mapping if all(value in readable for value in mapping.values()) else None

    def dense_info(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(dtype name, shape) of a logical tensor: the dequantized values for a bnb weight."""
        key = self.aliases.get(key, key)
        if key in self.quantized:
            q = self.quantized[key]
            return DTYPE_NAMES[q.dtype], q.shape
        info = self.entries[key]
        return info.dtype, info.shape

    def read_dense(self, key: str) -> Tensor:
        """A logical tensor, dequantized if it is a bnb weight (in its original dtype)."""
        key = self.aliases.get(key, key)
        if key not in self.quantized:
            return self.read(key)
        q = self.quantized[key]
        import bitsandbytes.functional as bnbf

        packed = self.read(key)
        if q.bits == 4:
            state = self._quant_state(q)
            return bnbf.dequantize_4bit(packed, state).to(q.dtype)
        scb = self.read(q.companions[0])
        return bnbf.int8_vectorwise_dequant(packed, scb).to(q.dtype)  # W = int8 · SCB / 127, per output row

    # -- bitsandbytes ---------------------------------------------------------------------------------------------

    def _find_quantized(self) -> dict[str, QuantizedWeight]:
        found: dict[str, QuantizedWeight] = {}
        attached: dict[str, list[str]] = {}  # "X.weight" -> its "X.weight.*" companions
        for key in self.entries:
            owner, sep, _ = key.partition(".weight.")
            if sep:
                attached.setdefault(owner + ".weight", []).append(key)
        for key, info in self.entries.items():
            if not key.endswith(".weight"):
                continue
            module = key[: -len(".weight")]
            companions = tuple(attached.get(key, ()))
            if any(k.startswith(f"{key}.quant_state.bitsandbytes__") for k in companions):
                q = QuantizedWeight(key, 4, companions, torch.float32, ())
                state = self._quant_state(q)
                found[key] = QuantizedWeight(key, 4, companions, state.dtype, tuple(state.shape))
            elif info.dtype == "I8" and f"{module}.SCB" in self.entries:
                extra = tuple(k for k in (f"{module}.SCB", f"{module}.weight_format") if k in self.entries)
                found[key] = QuantizedWeight(key, 8, extra, self._config_dtype(), info.shape)
        return found

    def _quant_state(self, q: QuantizedWeight) -> Any:
        import bitsandbytes.functional as bnbf

        parts = {c[len(q.key) + 1:]: self.read(c) for c in q.companions}
        try:
            return bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
        except Exception as exc:
            raise ValueError(f"Cannot rebuild the 4-bit quantization state of '{q.key}' in '{self.directory}': "
                             f"{exc}. The checkpoint is corrupted.") from exc

    def _config_dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        dtype = getattr(torch, str(name), None)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


class SafetensorsWriter:
    """Write one `.safetensors` file tensor by tensor, in a layout fixed up front.

    Format: 8-byte little-endian header length N, N bytes of JSON `{key: {dtype, shape, data_offsets}, __metadata__}`
    padded with spaces to a multiple of 8, then the tensors' bytes back to back. Tensors are laid out by decreasing
    element size so that every tensor starts aligned to its element size.

    Args:
        path: file to create.
        layout: (key, dtype name, shape) of every tensor the file will hold.
        metadata: string metadata (`{"format": "pt"}` is always set).
    """

    def __init__(self, path: str, layout: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        itemsize = {name: torch.empty((), dtype=dtype).element_size() for dtype, name in DTYPE_NAMES.items()}
        order = sorted(layout, key=lambda entry: -itemsize[entry[1]])
        header: dict[str, Any] = {"__metadata__": {**metadata, "format": "pt"}}
        offset = 0
        self.order: list[str] = []
        self.expected: dict[str, tuple[str, tuple[int, ...], int]] = {}
        for key, dtype, shape in order:
            nbytes = itemsize[dtype] * _numel(shape)
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected[key] = (dtype, tuple(shape), nbytes)
            self.order.append(key)
            offset += nbytes
        self.total_bytes = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path = path
        self._file = open(path, "wb")
        self._file.write(len(text).to_bytes(8, "little") + text)
        self._next = 0

    def write(self, key: str, tensor: Tensor) -> None:
        """Append the next tensor of the layout (the order is `self.order`); checks dtype, shape and size."""
        expected_key = self.order[self._next]
        dtype, shape, nbytes = self.expected[expected_key]
        if key != expected_key or DTYPE_NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{self.path}: writing '{key}' {tensor.dtype}{tuple(tensor.shape)}, but the layout "
                               f"expects '{expected_key}' {dtype}{shape} next.")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # (numel,) -> (nbytes,) raw bytes
        if data.numel() != nbytes:
            raise RuntimeError(f"{self.path}: '{key}' has {data.numel()} bytes, expected {nbytes}.")
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the file; raises if some tensor of the layout was never written."""
        self._file.close()
        if self._next != len(self.order):
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self.order)} tensors were written.")

    def abort(self) -> None:
        self._file.close()


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
