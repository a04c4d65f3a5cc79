"""SVFit: train the top singular values of each weight (arXiv 2409.05926).

    W = U Σ Vᵀ (fp32),   W' = W + U_r diag(s − σ⁰) V_rᵀ,   s ← σ⁰ at init,   only s is trained.

This is the paper's `W_e + U_r diag(s) V_rᵀ` written as a delta on the untouched base weight (spec §1.2), so the
init output is bit-exact in every dtype and merge is reversible. Conv kernels are viewed as
`(out, in/groups·k…)` matrices (spec §1.6).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from ..init.svd import SVDInit, svd_by_energy, truncated_svd
from .. import kernels
from .base import FrozenBase, MethodAdapter, zeros_like_shape
from .config import SpecPeftConfig
from .geometry import LayerGeometry

ForwardMode = Literal["auto", "factored", "materialized"]


@dataclass
class SVFitConfig(SpecPeftConfig):
    """SVFit options.

    Attributes:
        r: fixed number of singular values per layer; None selects r by `energy_threshold`.
        energy_threshold: smallest r with Σ_{i≤r} σᵢ² ≥ τ‖W‖_F² (the paper's "99 % of the information").
        max_rank: cap on the energy-selected r.
        rank_pattern: per-module r, keyed by module-name suffix or regex (full match); wins over `r`.
        svd: how the SVD is computed (`SVDInit(kind="randomized", ...)` for large layers with small r).
        forward_mode: "factored" adds `((x V_r) ⊙ (s − σ⁰)) U_rᵀ`; "materialized" runs the base op on W + ΔW;
            "auto" picks factored when `T·(d_in + d_out) < d_in·d_out` (T tokens in the batch).
    """

    METHOD = "SVFIT"

    r: Optional[int] = None
    energy_threshold: float = 0.99
    max_rank: Optional[int] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    svd: SVDInit = field(default_factory=SVDInit)
    forward_mode: ForwardMode = "auto"

    def validate(self) -> None:
        if self.r is not None and self.r < 1:
            raise ValueError(f"SVFitConfig.r={self.r}: must be ≥ 1 (or None to select r by energy_threshold).")
        if not 0.0 < self.energy_threshold <= 1.0:
            raise ValueError(f"SVFitConfig.energy_threshold={self.energy_threshold}: must be in (0, 1], e.g. 0.99.")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"SVFitConfig.max_rank={self.max_rank}: must be ≥ 1 or None.")
        for key, rank in self.rank_pattern.items():
            if rank < 1:
                raise ValueError(f"SVFitConfig.rank_pattern[{key!r}]={rank}: ranks must be ≥ 1.")

    def rank_for(self, name: str) -> Optional[int]:
        """The fixed rank for module `name` (rank_pattern, then r), or None for energy selection."""
        for key, rank in self.rank_pattern.items():
            if name == key or name.endswith("." + key) or re.fullmatch(key, name):
                return rank
        return self.r


class SVFitAdapter(MethodAdapter):
    """Frozen top-r singular vectors (buffers U, V, σ⁰) and trainable singular values s.

    Shapes: U (d_out, r), V (d_in, r), σ⁰ (r,), s (r,), with `(d_out, d_in)` the weight viewed as a matrix.
    """

    expensive_init = True
    # On an H100 (bf16, fwd+bwd) the torch path beat the Triton one at 4096² and 4096×11008, T ∈ {1024, 4096}:
    # benchmarks/results/speed_cuda.md. Triton stays available with kernel_backend="triton".
    triton_by_default = False

    def __init__(self, geometry: LayerGeometry, U: Tensor, S: Tensor, V: Tensor, forward_mode: ForwardMode) -> None:
        super().__init__(geometry)
        self.register_buffer("U", U.float().contiguous())
        self.register_buffer("V", V.float().contiguous())
        self.register_buffer("sigma0", S.float().clone())
        self.s = nn.Parameter(S.float().clone())
        self.forward_mode = forward_mode

    @classmethod
    def create(
        cls, geometry: LayerGeometry, config: SVFitConfig, weight: Tensor | None, record: dict | None, name: str = ""
    ) -> SVFitAdapter:
        d_out, d_in = geometry.matrix_shape
        rank = (record or {}).get("r") or config.rank_for(name)
        if weight is None:
            if rank is None:
                raise ValueError(
                    f"SVFit layer '{name}': no saved rank to rebuild from. Load adapters with the adapter_config.json "
                    "they were saved with (it records each layer's rank), or set SVFitConfig.r."
                )
            zeros = zeros_like_shape
            return cls(geometry, zeros((d_out, rank)), zeros((rank,)), zeros((d_in, rank)), config.forward_mode)
        matrix = weight.reshape(d_out, d_in)  # (out, in/groups, *k) -> (out, in/groups·prod(k))
        if rank is not None:
            if rank > min(d_out, d_in):
                raise ValueError(
                    f"SVFit layer '{name}': r={rank} exceeds min(d_out, d_in)={min(d_out, d_in)} of its "
                    f"{d_out}×{d_in} weight. Lower SVFitConfig.r or add a rank_pattern entry for this layer."
                )
            U, S, V = truncated_svd(matrix, rank, config.svd)
        else:
            U, S, V = svd_by_energy(matrix, config.energy_threshold, config.max_rank, config.svd)
        return cls(geometry, U, S, V, config.forward_mode)

    @property
    def rank(self) -> int:
        return self.s.numel()

    def record(self) -> dict:
        return {"r": self.rank}

    def delta_weight(self) -> Tensor:
        delta = (self.U * (self.s - self.sigma0)) @ self.V.T  # (out, r) · (r, in) -> (out, in)
        return delta.reshape(self.geometry.weight_shape)

    def _use_factored(self, x: Tensor) -> bool:
        if self.geometry.is_conv or self.forward_mode == "materialized":
            return False
        if self.forward_mode == "factored":
            return True
        d_out, d_in = self.geometry.matrix_shape
        tokens = x.numel() // d_in
        return tokens * (d_in + d_out) < d_in * d_out

    def _factored_delta(self, x: Tensor) -> Tensor:
        scale = (self.s - self.sigma0).to(x.dtype)
        hidden = (x @ self.V.to(x.dtype)) * scale  # (..., in) -> (..., r)
        return hidden @ self.U.T.to(x.dtype)  # (..., r) -> (..., out)

    def delta_forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        if self.geometry.is_conv:
            return super().delta_forward(x, base)
        return self._factored_delta(x)

    def forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        if self._use_factored(x):
            fused = self._fused_factored(x, base)
            if fused is not None:
                return fused
            return base(x) + self._factored_delta(x)
        return base.forward_with_delta(x, self.delta_weight())

    # -- fused kernel path (specpeft.kernels, issue 9) ------------------------------------------------------------

    def _fused_factored(self, x: Tensor, base: FrozenBase) -> Optional[Tensor]:
        """x Wᵀ + b + ((x V) ⊙ (s − σ⁰)) Uᵀ in one fused Triton GEMM (`lowrank_linear`) when Triton is forced (config,
        `SPECPEFT_KERNELS`; "auto" runs torch: `triton_by_default`) and the base is a plain nn.Linear; None otherwise
        (then the eager path runs)."""
        geometry = self.geometry
        if not geometry.is_plain_linear:
            return None
        module = base.module
        if self.kernel_path(x, module.weight) != "triton":
            return None
        return kernels.lowrank_linear(
            x, self.V, self.s - self.sigma0, self.U, weight=module.weight, bias=module.bias, backend="triton"
        )

    def extra_repr(self) -> str:
        return f"r={self.rank}, forward_mode={self.forward_mode}"


REGISTRATION = dict(
    name="svfit",
    config_cls=SVFitConfig,
    adapter_cls=SVFitAdapter,
    description="SVFit: train the top-r singular values of each weight (r by 99 % energy).",
)
