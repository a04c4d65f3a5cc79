"""FLoRA: a Tucker "core space" update for Linear and Conv1d/2d/3d weights (arXiv 2405.14739, ICLR 2025).

Modes are ordered [in, out, k_1, …, k_{N−2}] with in = in_channels / groups (spec §3.1, §3.6):

    ΔT = G ×₀ P₀ ×₁ P₁ … ×_{N−1} P_{N−1},        ΔW = s · ΔT with modes 0 and 1 swapped → (out, in/groups, *k)
    ΔW[o, i, κ] = s · Σ_{a,b,c…} G[a, b, c…] P₀[i, a] P₁[o, b] Π_j P_{2+j}[κ_j, c_j]

P_i ∈ R^{dims_i × r_i} (Kaiming normal with a = √3, as in the official code) and the core G ∈ R^{r₀ × … × r_{N−1}}
(zeros, so ΔW = 0 at init) are trained; the base layer is frozen. Linear (N = 2) is ΔW = s · P₁ Gᵀ P₀ᵀ.

Forward (spec §3.4): Linear runs three thin matmuls `((x P₀) G) P₁ᵀ`; a conv runs a 1×1 conv (in → r₀), a small
core conv (r₀ → r₁, kernel K = G ×₂ P₂ …, the base stride/padding/dilation), and a 1×1 conv (r₁ → out), each grouped
like the base conv, whenever a MAC count says that beats materializing ΔW into the base weight. A conv subclass
with its own forward (e.g. EfficientNet's static "same" padding) always materializes, through that forward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels._dispatch import autocast_off
from .base import FrozenBase, MethodAdapter, zeros_like_shape
from .config import SpecPeftConfig
from .geometry import LayerGeometry

ForwardMode = Literal["auto", "factored", "materialized"]
RankSpec = Union[int, list[int]]

_CONV_FN = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}
# Backward of a chain of matmuls/convs costs about twice its forward (input grad + weight grad of every stage).
_BACKWARD_FACTOR = 2.0


@dataclass
class FLoRAConfig(SpecPeftConfig):
    """FLoRA options.

    Attributes:
        r: rank per mode: one int for every mode, or a list in mode order [in, out, k_1, …] (2 entries for
            Linear, 3 for Conv1d, 4 for Conv2d, 5 for Conv3d). Ranks above a mode's size are clamped to it.
        rank_pattern: per-module ranks (int or list), keyed by module-name suffix or regex (full match); wins over r.
        scale: the free multiplier s of ΔW (the official ConvNeXt example uses 4.0).
        dropout: dropout probability on the adapter's input (the base path never sees it).
        forward_mode: "factored" uses the thin-matmul / three-stage-conv path (where the layer's forward is the
            standard op; other convs always materialize); "materialized" runs the base op on W + ΔW; "auto" picks
            the one with fewer multiply-adds for the batch at hand, counting backward when gradients are on.
    """

    METHOD = "FLORA"

    r: RankSpec = 8
    rank_pattern: dict[str, RankSpec] = field(default_factory=dict)
    scale: float = 1.0
    dropout: float = 0.0
    forward_mode: ForwardMode = "auto"

    def validate(self) -> None:
        _check_ranks("FLoRAConfig.r", self.r)
        for key, ranks in self.rank_pattern.items():
            _check_ranks(f"FLoRAConfig.rank_pattern[{key!r}]", ranks)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FLoRAConfig.dropout={self.dropout}: must be in [0, 1), e.g. 0.0 or 0.05.")
        if not math.isfinite(self.scale):
            raise ValueError(f"FLoRAConfig.scale={self.scale}: must be a finite number, e.g. 1.0.")

    def rank_spec_for(self, name: str) -> RankSpec:
        """The rank spec of module `name`: the first matching rank_pattern entry, else `r`."""
        for key, ranks in self.rank_pattern.items():
            if name == key or name.endswith("." + key) or re.fullmatch(key, name):
                return ranks
        return self.r


def _check_ranks(label: str, ranks: RankSpec) -> None:
    values = [ranks] if isinstance(ranks, int) else list(ranks)
    if not isinstance(ranks, int) and not 2 <= len(values) <= 5:
        raise ValueError(f"{label}={ranks!r}: give one int or a list of 2 (Linear) to 5 (Conv3d) per-mode ranks.")
    if any(v < 1 for v in values):
        raise ValueError(f"{label}={ranks!r}: every rank must be ≥ 1.")


def mode_sizes(geometry: LayerGeometry) -> tuple[int, ...]:
    """Tensor modes of the weight in FLoRA's order [in/groups, out, *kernel]."""
    out, in_per_group, *kernel = geometry.weight_shape
    return (in_per_group, out, *kernel)


def resolve_ranks(spec: RankSpec, geometry: LayerGeometry, name: str = "") -> list[int]:
    """Per-mode ranks for a layer, each clamped to its mode size (a rank above the size adds only redundancy)."""
    sizes = mode_sizes(geometry)
    ranks = [spec] * len(sizes) if isinstance(spec, int) else list(spec)
    if len(ranks) != len(sizes):
        raise ValueError(
            f"FLoRA layer '{name}': ranks {spec!r} give {len(ranks)} entries, but its {geometry.kind} weight has "
            f"{len(sizes)} modes [in, out, kernel…] of sizes {list(sizes)}. Use one int, a list of {len(sizes)}, "
            "or a rank_pattern entry for this module."
        )
    return [min(r, d) for r, d in zip(ranks, sizes)]


def trainable_count(sizes: tuple[int, ...] | list[int], ranks: list[int]) -> int:
    """Trainable parameters of one layer: Σ_i dims_i · r_i + Π_i r_i (spec §3.7)."""
    return sum(d * r for d, r in zip(sizes, ranks)) + math.prod(ranks)


class FLoRAAdapter(MethodAdapter):
    """Trainable factors `factor_i` (dims_i, r_i) for every mode and the trainable core `core` (r₀, …, r_{N−1}).

    Mode 0 is the input channels per group, mode 1 the output channels, modes 2… the kernel axes.
    """

    def __init__(
        self,
        geometry: LayerGeometry,
        factors: list[Tensor],
        core: Tensor,
        scale: float,
        dropout: float,
        forward_mode: ForwardMode,
    ) -> None:
        super().__init__(geometry)
        self.n_modes = len(factors)
        for i, factor in enumerate(factors):
            setattr(self, f"factor_{i}", nn.Parameter(factor.float().contiguous()))
        self.core = nn.Parameter(core.float().contiguous())
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.forward_mode = forward_mode

    @classmethod
    def create(
        cls, geometry: LayerGeometry, config: FLoRAConfig, weight: Tensor | None, record: dict | None, name: str = ""
    ) -> FLoRAAdapter:
        saved = (record or {}).get("ranks")
        ranks = resolve_ranks(saved if saved is not None else config.rank_spec_for(name), geometry, name)
        sizes = mode_sizes(geometry)
        factors = [zeros_like_shape((d, r)) for d, r in zip(sizes, ranks)]
        if weight is not None:  # fresh init (no checkpoint): data-free, the weight itself is not used
            for factor in factors:
                # (dims_i, r_i): fan_in = r_i, gain √(2/(1+3)) → P_i ~ N(0, 1/(2 r_i)), as in the official code
                nn.init.kaiming_normal_(factor, a=math.sqrt(3))
        core = zeros_like_shape(tuple(ranks))  # zero core: ΔW = 0 exactly at init
        return cls(geometry, factors, core, config.scale, config.dropout, config.forward_mode)

    # -- structure ----------------------------------------------------------------------------------------------

    @property
    def factors(self) -> list[Tensor]:
        return [getattr(self, f"factor_{i}") for i in range(self.n_modes)]

    @property
    def ranks(self) -> list[int]:
        return list(self.core.shape)

    def record(self) -> dict:
        return {"ranks": self.ranks}

    def core_kernel(self) -> Tensor:
        """K[b, a, κ] = Σ_c G[a, b, c…] Π_j P_{2+j}[κ_j, c_j]: the core with its kernel modes expanded, (r₁, r₀, *k),
        in the core's dtype (under autocast too: a chain of contractions would otherwise mix bf16 and fp32)."""
        kernel = self.core
        with autocast_off(kernel.device.type):
            for factor in self.factors[2:]:
                # (r0, r1, c_j, …, k_<j) · (k_j, c_j) → (r0, r1, …, k_<j, k_j): contract the first unexpanded rank axis
                kernel = torch.tensordot(kernel, factor, dims=([2], [1]))
        return kernel.transpose(0, 1)  # (r0, r1, *k) -> (r1, r0, *k)

    def delta_weight(self) -> Tensor:
        """ΔW = s · P₁ K P₀ᵀ per kernel position, (out, in/groups, *k), fp32."""
        factor_in, factor_out = self.factors[:2]
        out, in_per_group, *kernel_size = self.geometry.weight_shape
        r_in, r_out = self.ranks[:2]
        k = math.prod(kernel_size)
        kernel = (self.core_kernel() * self.scale).reshape(r_out, r_in, k)  # (r1, r0, *k) -> (r1, r0, K)
        # Two plain 2-D mm, never a broadcast matmul: torch.matmul picks its kernel by requires_grad, so a reloaded
        # frozen adapter would round differently from the trained one. Cost r1·K·r0·in + out·r1·in·K (see `costs`).
        kernel = kernel.transpose(1, 2).reshape(r_out * k, r_in)  # (r1, r0, K) -> (r1·K, r0)
        partial = (kernel @ factor_in.T).reshape(r_out, k, in_per_group)  # (r1·K, r0)·(r0, in) -> (r1, K, in)
        partial = partial.transpose(1, 2).reshape(r_out, in_per_group * k)  # -> (r1, in, K) -> (r1, in·K)
        delta = factor_out @ partial  # (out, r1) · (r1, in·K) -> (out, in·K)
        return delta.reshape(out, in_per_group, *kernel_size)  # (out, in·K) -> (out, in, *k)

    # -- cost model ---------------------------------------------------------------------------------------------

    def _factored_available(self) -> bool:
        # Linear: x ΔWᵀ needs no knowledge of the base op. Conv: the three stages reproduce F.convNd only.
        return not self.geometry.is_conv or self.geometry.standard_forward

    def _output_positions(self, x: Tensor) -> tuple[int, int]:
        """(input, output) spatial positions × batch of a conv on x."""
        geometry = self.geometry
        kernel = geometry.weight_shape[2:]
        spatial = x.shape[-len(kernel):]
        batch = x.numel() // (math.prod(spatial) * geometry.weight_shape[1] * geometry.groups)
        out_sizes = []
        for j, (length, k) in enumerate(zip(spatial, kernel)):
            if geometry.padding == "same":
                out_sizes.append(length)
                continue
            pad = 0 if geometry.padding == "valid" else geometry.padding[j]
            span = geometry.dilation[j] * (k - 1) + 1
            out_sizes.append((length + 2 * pad - span) // geometry.stride[j] + 1)
        return batch * math.prod(spatial), batch * math.prod(out_sizes)

    def costs(self, x: Tensor) -> tuple[float, float]:
        """Multiply-adds of the adapter's extra work on batch x: (factored, materialized).

        Factored: the three stages, forward and (if training) backward. Materialized: building ΔW and adding it to
        W, and with grad enabled the weight-gradient op `∂L/∂(W+ΔW)` that a frozen base never computes (plus a second
        full op when dropout makes the adapter input differ from the base input).
        """
        geometry = self.geometry
        r_in, r_out = self.ranks[:2]
        out, in_per_group, *kernel = geometry.weight_shape
        k = math.prod(kernel)
        groups = geometry.groups
        # Grad mode only (not requires_grad): a frozen, reloaded adapter must take the same path as the trained one.
        training = torch.is_grad_enabled()
        if geometry.is_conv:
            positions_in, positions_out = self._output_positions(x)
            stage_in = positions_in * in_per_group * groups * r_in  # 1×1 reduce, at input resolution
            factored = stage_in + positions_out * (groups * r_in * r_out * k + out * r_out)  # core conv + 1×1 expand
            full_op = positions_out * out * in_per_group * k
        else:
            tokens = x.numel() // in_per_group
            factored = tokens * (in_per_group * r_in + r_in * r_out + r_out * out)
            full_op = tokens * out * in_per_group
        build = r_out * r_in * in_per_group * k + out * r_out * in_per_group * k + out * in_per_group * k
        materialized = float(build)
        if self.dropout_active:
            materialized += full_op  # the delta op runs on dropout(x), separately from the base op
        if training:
            factored *= 1.0 + _BACKWARD_FACTOR
            materialized = materialized * (1.0 + _BACKWARD_FACTOR) + full_op
        return float(factored), materialized

    @property
    def dropout_active(self) -> bool:
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training

    def use_factored(self, x: Tensor) -> bool:
        """Whether this batch runs the factored path (see `FLoRAConfig.forward_mode`)."""
        if self.forward_mode == "materialized" or not self._factored_available():
            return False
        if self.forward_mode == "factored":
            return True
        factored, materialized = self.costs(x)
        return factored < materialized

    # -- forward ------------------------------------------------------------------------------------------------

    def _factored_linear(self, x: Tensor) -> Tensor:
        factor_in, factor_out = (f.to(x.dtype) for f in self.factors)
        core = (self.core * self.scale).to(x.dtype)
        # 2-D mm on the flattened tokens, for the same reason as in `delta_weight`.
        hidden = x.reshape(-1, x.shape[-1]) @ factor_in  # (..., in) -> (T, in) -> (T, r0)
        hidden = (hidden @ core) @ factor_out.T  # (T, r0) -> (T, r1) -> (T, out)
        return hidden.reshape(*x.shape[:-1], hidden.shape[-1])  # (T, out) -> (..., out)

    def _factored_conv(self, x: Tensor) -> Tensor:
        """1×1 conv (in → r₀) → core conv (r₀ → r₁, base stride/padding/dilation) → 1×1 conv (r₁ → out).

        With g groups every stage is grouped: group γ maps its in/g channels to its own r₀ (shared P₀), then its own
        r₁ (shared K), then its out/g outputs read only group γ's r₁ channels. Linearity of conv in input and kernel
        gives Σ_i conv(x_{γ,i}, s Σ_{a,b} P₁[o,b] K[b,a] P₀[i,a]) = conv(x, ΔW, groups=g).
        """
        geometry = self.geometry
        conv = _CONV_FN[geometry.kind]
        groups = geometry.groups
        factor_in, factor_out = self.factors[:2]
        ones = (1,) * (self.n_modes - 2)
        reduce = factor_in.T.reshape(factor_in.shape[1], factor_in.shape[0], *ones)  # (in/g, r0) -> (r0, in/g, 1…)
        reduce = reduce.repeat(groups, *(1,) * (self.n_modes - 1)).to(x.dtype)  # -> (g·r0, in/g, 1…)
        kernel = self.core_kernel() * self.scale  # (r1, r0, *k)
        kernel = kernel.repeat(groups, *(1,) * (self.n_modes - 1)).to(x.dtype)  # -> (g·r1, r0, *k)
        expand = factor_out.reshape(*factor_out.shape, *ones).to(x.dtype)  # (out, r1) -> (out, r1, 1…)
        hidden = conv(x, reduce, None, 1, 0, 1, groups)  # (B, in, *S) -> (B, g·r0, *S)
        # (B, g·r0, *S) -> (B, g·r1, *S'), S' the base conv's output size: the core conv carries all spatial behaviour
        hidden = conv(hidden, kernel, None, geometry.stride, geometry.padding, geometry.dilation, groups)
        return conv(hidden, expand, None, 1, 0, 1, groups)  # (B, g·r1, *S') -> (B, out, *S')

    def factored_delta(self, x: Tensor) -> Tensor:
        """op(x, ΔW) without forming ΔW (x is the adapter input, dropout already applied)."""
        return self._factored_conv(x) if self.geometry.is_conv else self._factored_linear(x)

    def materialized_delta(self, x: Tensor, base: FrozenBase) -> Tensor:
        """op(x, ΔW) with ΔW formed; a conv with its own forward (e.g. "same" padding) runs that forward on ΔW."""
        return base.apply_weight(x, self.delta_weight())

    def delta_forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        x = self.dropout(x)
        return self.factored_delta(x) if self.use_factored(x) else self.materialized_delta(x, base)

    def forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        if self.use_factored(x):
            return base(x) + self.factored_delta(self.dropout(x))
        if self.dropout_active:
            return base(x) + self.materialized_delta(self.dropout(x), base)
        return base.forward_with_delta(x, self.delta_weight())

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, scale={self.scale}, forward_mode={self.forward_mode}"


REGISTRATION = dict(
    name="flora",
    config_cls=FLoRAConfig,
    adapter_cls=FLoRAAdapter,
    description="FLoRA: Tucker core-space update ΔW = s·G ×₀ P₀ ×₁ P₁ … for Linear and Conv1d/2d/3d.",
)
