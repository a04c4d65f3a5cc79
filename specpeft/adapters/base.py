"""The method contract: one adapter of one method on one layer, peft-free and testable on bare tensors.

A method supplies a `MethodAdapter` subclass (its tensors and math) and a config class; the generic peft bridge
(`bridge.py`) does the rest: injection, named adapters, merge/unmerge, save/load.

Conventions every method follows (design.md §4):
    * trainable tensors are `nn.Parameter`s kept in fp32; frozen tensors are buffers (persistent unless shared);
    * `delta_weight()` is the single primitive behind merge, unmerge, export and inspect;
    * at init the layer output equals the base output.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, nn

from ..kernels import kernel_backend, requested_backend
from .geometry import LayerGeometry, forward_with_weight


class FrozenBase:
    """The frozen base layer as an adapter sees it: its output, its weight, and its forward with a delta added.

    Args:
        module: the base layer (nn.Linear, nn.ConvNd, transformers Conv1D or a bnb quantized Linear).
        geometry: its geometry (`LayerGeometry.of(module)`).
        quantization_backend: peft's backend for quantized bases (dequantizes the weight), or None.
    """

    def __init__(self, module: nn.Module, geometry: LayerGeometry | None = None, quantization_backend: Any = None):
        self.module = module
        self.geometry = geometry or LayerGeometry.of(module)
        self.quantization_backend = quantization_backend

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.module(x, *args, **kwargs)

    def weight(self) -> Tensor:
        """The base weight in normalized layout `(out, in/groups, *kernel)`, dequantized if needed."""
        if self.quantization_backend is not None:
            return self.quantization_backend.get_base_weight(self.module)
        return self.geometry.from_storage(self.module.weight)

    def apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """op(x, weight) (+ bias) with this layer's settings, e.g. an adapter's delta term op(x, ΔW).

        A conv with its own forward (e.g. EfficientNet's "same" padding) runs that forward on `weight`, its bias slot
        holding `bias` or zeros (adding 0.0 is exact), so the padding matches the base output's.
        """
        geometry = self.geometry
        if not geometry.is_conv or geometry.standard_forward:
            return geometry.apply(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        module = self.module
        params = {"weight": geometry.to_storage(weight).to(x.dtype)}
        if getattr(module, "bias", None) is not None:
            params["bias"] = torch.zeros_like(module.bias, dtype=x.dtype) if bias is None else bias.to(x.dtype)
        elif bias is not None:
            raise ValueError(f"{type(module).__name__} has no bias slot for the bias given to apply_weight.")
        return torch.func.functional_call(module, params, (x,))

    def forward_with_delta(self, x: Tensor, delta: Tensor) -> Tensor:
        """Output of the layer with weight W + delta: one op on the merged weight, or base + delta op if quantized."""
        if self.geometry.quantized:
            return self(x) + self.geometry.apply(x, delta.to(x.dtype))
        weight = self.weight()
        return forward_with_weight(self.module, self.geometry, x, weight + delta.to(weight.dtype))


def without_narrowing(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A module's `_apply` function, or a device-only move where it would narrow fp32 tensors to 16 bits.

    Adapter tensors keep their precision under `model.to(torch.bfloat16)` / `.half()`: a trained update stored next to
    its frozen start (SVFit's σ and σ⁰, SoKA's A and A⁰) or multiplied with seeded frozen factors (TeRA) would be
    rounded on the scale of the start, or stop matching the factors a reload regenerates. The forwards cast to the
    input's dtype anyway. Casts to float64 apply (reference computations).
    """
    # Probed on empty tensors: every adapter module sees every `.to()` / `.cuda()`, and a probe with an element
    # would copy it to the device, once per adapter.
    if fn(torch.empty(0, dtype=torch.float32)).dtype not in (torch.float16, torch.bfloat16):  # what it does to fp32
        return fn
    # each tensor goes where the cast sends it from its own device (a dtype-only cast leaves it there)
    return lambda t: t.to(device=fn(t.new_empty(0, dtype=torch.float32)).device)


class MethodAdapter(nn.Module, metaclass=ABCMeta):
    """Base class of a method's per-layer adapter.

    Subclasses implement `create` and `delta_weight` (abstract), usually `record`, and override `forward` /
    `delta_forward` with the efficient form of their spec.

    Class attributes:
        supported_kinds: geometry kinds the method adapts ("linear", "conv1d", "conv2d", "conv3d").
        expensive_init: the init runs a decomposition (an SVD); the bridge shows a progress bar over layers.
        triton_by_default: "auto" runs this method's Triton path on CUDA tensors. False for a method whose torch
            path trained faster on a GPU (then Triton runs only when forced by the config or `SPECPEFT_KERNELS`).
        uses_shared_state: the method keeps frozen tensors shared by many layers (peft VeRA's pattern). The tuner
            then owns one `BufferDict` per adapter (`<prefix>shared.<adapter>`) and passes it to `create` as the
            keyword `shared=`; adapters keep a reference to it (never a copy, never an nn.Parameter).
    """

    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "conv2d", "conv3d")
    expensive_init: ClassVar[bool] = False
    uses_shared_state: ClassVar[bool] = False
    triton_by_default: ClassVar[bool] = True
    # The config's `kernel_backend`, set by the bridge after `create`; read through `kernel_path`.
    kernel_backend: str = "auto"
    # Built without its initializer for a checkpoint to fill (a config read by `from_pretrained`); cleared when a
    # state dict loads into this adapter. The bridge refuses to run or merge an adapter still waiting.
    awaiting_checkpoint: bool = False

    @classmethod
    def saves_shared_state(cls, config: Any) -> bool:
        """Whether the shared buffers of `uses_shared_state` go into the saved adapter file (else regenerated)."""
        return False

    def __init__(self, geometry: LayerGeometry) -> None:
        super().__init__()
        self.geometry = geometry

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.awaiting_checkpoint and any(key.startswith(prefix) for key in state_dict):
            self.awaiting_checkpoint = False

    @classmethod
    @abstractmethod
    def create(
        cls, geometry: LayerGeometry, config: Any, weight: Tensor | None, record: dict | None, name: str = ""
    ) -> MethodAdapter:
        """Build the adapter for one layer.

        Args:
            geometry: the wrapped layer's geometry.
            config: the method's config.
            weight: the base weight in normalized layout (any dtype, dequantized), or None when the tensors will be
                loaded from a checkpoint or live on the meta device: then build from `record` with zero tensors and
                run no decomposition.
            record: this layer's saved decisions (`record()` of an earlier run), or None on a fresh init.
            name: the module's name, for error messages and per-module options.
        """

    @classmethod
    def after_injection(cls, adapters: dict[str, MethodAdapter], config: Any) -> None:
        """Hook run once after a fresh (not loaded) adapter was created in every targeted layer; default: nothing.

        For decisions across layers (e.g. a global parameter budget). `adapters` maps module name → this layer's
        new adapter; a method that changes a layer must also update `config.layer_records[name]`.
        """

    @classmethod
    def forward_pass(cls, adapters: Iterable[MethodAdapter]) -> AbstractContextManager[None]:
        """Context around one forward pass of the adapted model (the tuner enters it for every forward and generate),
        given the adapters that may run in it (a lazy iterable); default: nothing.

        For work shared by the layers of one pass (TeRA forms the networks of all same-shape layers in one node).
        """
        return nullcontext()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MethodAdapter:
        return super()._apply(without_narrowing(fn), recurse)

    def kernel_path(self, *tensors: Tensor | None) -> str:
        """"triton" or "torch": which implementation a fused kernel op runs on these tensors for this adapter.

        The config's `kernel_backend` wins when it forces one; "auto" defers to `SPECPEFT_KERNELS`, then to
        `triton_by_default` and the device.
        """
        forced = None if self.kernel_backend == "auto" else self.kernel_backend
        if forced is None and not self.triton_by_default and requested_backend() == "auto":
            return "torch"
        return kernel_backend(*tensors, backend=forced)

    def record(self) -> dict:
        """JSON-serializable per-layer decisions (ranks, shapes, seeds) that `create` needs without `weight`."""
        return {}

    @abstractmethod
    def delta_weight(self) -> Tensor:
        """ΔW in normalized layout `(out, in/groups, *kernel)`, fp32, differentiable in the trainables."""

    def delta_forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        """The adapter's additive output term, `op(x, ΔW)`; used when several adapters are active."""
        return base.apply_weight(x, self.delta_weight())

    def forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        """Full layer output `op(x, W + ΔW) (+ bias)`; the default adds the delta term to the base output."""
        return base(x) + self.delta_forward(x, base)


def zeros_like_shape(shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """fp32 zeros used for tensors that a checkpoint will overwrite (never uninitialized memory)."""
    return torch.zeros(shape, dtype=torch.float32, device=device)
