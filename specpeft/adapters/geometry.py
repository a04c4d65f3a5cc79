"""What an adapter needs to know about the layer it wraps: shapes, weight layout and how to apply a weight.

Every method works on the weight in one normalized layout, PyTorch's `(out, in/groups, *kernel)`. transformers'
`Conv1D` (GPT-2) stores `(in, out)`; that is recorded here per layer (`fan_in_fan_out=True`) and undone only when a
weight is read from or written to the base layer, never by changing the user's config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LayerKind = Literal["linear", "conv1d", "conv2d", "conv3d"]

_CONV_KINDS: dict[type, LayerKind] = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
_CONV_FN = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


def _transformers_conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def _bnb_linear_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except Exception:  # bnb raises assorted errors on unsupported platforms
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


@dataclass(frozen=True)
class LayerGeometry:
    """Shape and application rule of a wrapped base layer, in the normalized `(out, in/groups, *kernel)` layout.

    Attributes:
        kind: "linear" (nn.Linear, transformers Conv1D, bnb Linear4bit/8bitLt) or "conv{1,2,3}d".
        weight_shape: normalized weight shape `(out, in/groups, *kernel)`; `(out, in)` for linear.
        fan_in_fan_out: the base stores its weight transposed, `(in, out)` (transformers Conv1D).
        quantized: the base weight is quantized (bnb); it can only be read dequantized, never substituted.
        standard_forward: the base's forward is exactly `F.linear` / `F.convNd` with the fields below, so a factored
            adapter path may reproduce it; subclasses with their own forward (e.g. "same" padding) set False.
    """

    kind: LayerKind
    weight_shape: tuple[int, ...]
    fan_in_fan_out: bool = False
    quantized: bool = False
    standard_forward: bool = True
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the weight viewed as a matrix: `in/groups · prod(kernel)`."""
        return math.prod(self.weight_shape[1:])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def is_plain_linear(self) -> bool:
        """An unquantized `nn.Linear`-style layer (`F.linear` forward, (out, in) weight): what fused kernels take."""
        return self.kind == "linear" and not self.quantized and self.standard_forward and not self.fan_in_fan_out

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """`F.linear` or `F.convNd` of `x` with a weight in normalized layout and the base's conv settings."""
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return _CONV_FN[self.kind](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def to_storage(self, weight: Tensor) -> Tensor:
        """Normalized layout → the layout the base layer stores (transposed for Conv1D)."""
        return weight.T if self.fan_in_fan_out else weight

    def from_storage(self, weight: Tensor) -> Tensor:
        """The base layer's stored layout → normalized layout."""
        return weight.T if self.fan_in_fan_out else weight

    def to_record(self) -> dict:
        """JSON form, saved with each layer's record so exporters rebuild ΔW without the model."""
        return {f: (list(v) if isinstance(v, tuple) else v) for f, v in self.__dict__.items()}

    @classmethod
    def from_record(cls, record: dict) -> LayerGeometry:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})

    @classmethod
    def of(cls, base: nn.Module, name: str = "") -> LayerGeometry:
        """Geometry of a supported base layer; raises naming the module and the supported types otherwise."""
        if isinstance(base, _bnb_linear_types()):
            return cls("linear", (base.out_features, base.in_features), quantized=True, standard_forward=False)
        if isinstance(base, nn.Linear):
            return cls("linear", tuple(base.weight.shape), standard_forward=type(base).forward is nn.Linear.forward)
        conv1d_cls = _transformers_conv1d()
        if conv1d_cls is not None and isinstance(base, conv1d_cls):
            in_features, out_features = base.weight.shape
            return cls("linear", (out_features, in_features), fan_in_fan_out=True, standard_forward=False)
        for conv_type, kind in _CONV_KINDS.items():
            if isinstance(base, conv_type):
                standard = type(base).forward is conv_type.forward and base.padding_mode == "zeros"
                return cls(
                    kind,
                    tuple(base.weight.shape),
                    standard_forward=standard,
                    stride=tuple(base.stride),
                    padding=base.padding if isinstance(base.padding, str) else tuple(base.padding),
                    dilation=tuple(base.dilation),
                    groups=base.groups,
                )
        raise TypeError(
            f"Module '{name}' is a {type(base).__name__}; specpeft adapters wrap nn.Linear, nn.Conv1d/2d/3d, "
            "transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt. Remove it from `target_modules` "
            "(or add it to `exclude_modules`)."
        )


def forward_with_weight(base: nn.Module, geometry: LayerGeometry, x: Tensor, weight: Tensor) -> Tensor:
    """Run the base layer's own forward with `weight` (normalized layout) substituted for its weight.

    Using the module's own forward keeps subclasses with custom padding or layout exact; the substituted weight
    carries the adapter's gradient.
    """
    if geometry.quantized:
        raise ValueError("A quantized base weight cannot be substituted; add the adapter output instead.")
    if geometry.standard_forward:
        return geometry.apply(x, weight.to(x.dtype), None if base.bias is None else base.bias.to(x.dtype))
    stored = geometry.to_storage(weight).to(base.weight.dtype)
    return torch.func.functional_call(base, {"weight": stored}, (x,))
