"""SoKA: Kronecker adapters initialized by the Kronecker-product SVD of the pretrained weight (arXiv 2506.15251).

    R(W) ≈ Σ_{k≤r} σ_k u_k v_kᵀ,   A⁰_k = √σ_k·mat(u_k) (m1×n1),   B⁰_k = √σ_k·mat(v_k) (m2×n2)     (KPSVD, spec §2.2)
    W' = W − Σ_k A⁰_k⊗B⁰_k + Σ_k A_k⊗B_k,   A ← A⁰, B ← B⁰ at init, only A and B are trained.

This is the paper's residual form W' = W_res + Σ_k A_k⊗B_k with W_res = W − Σ_k A⁰_k⊗B⁰_k (spec §2.3, eq. 2), but
the base weight is never replaced: A⁰, B⁰ are persistent buffers, so multiple adapters, quantized bases, disabling
and reloading work unchanged. The adapter adds

    ΔW = Σ_k A_k⊗B_k − A⁰_k⊗B⁰_k = Σ_k (A_k − A⁰_k)⊗B_k + A⁰_k⊗(B_k − B⁰_k),

a sum of 2r Kronecker products whose factors are exactly zero at init. Hence ΔW = 0 and the layer output equals the
base output bit for bit in every dtype (no bf16 tolerance: no residual is ever rounded), and a trained ΔW is never the
difference of two large, nearly equal terms. The linear forward applies all 2r components by the reshape identity
(`KroneckerDeltaFunction`: two GEMMs per token chunk, a hand-written backward that differentiates only Σ A_k⊗B_k and
saves only x) and never forms A⊗B or ΔW; with Triton forced (`kernel_backend="triton"` or `SPECPEFT_KERNELS`; "auto"
runs torch, see `triton_by_default`) plain linears run the fused `kernels.kronecker_linear` instead. Conv kernels
are viewed as (out, in/groups·prod(k)) matrices and run the base conv once on W + ΔW (ΔW is kernel-sized,
negligible next to the conv itself). Zero-padded shapes (prime dims, spec §2.4) pad x's last dim and crop the
output; merge crops Σ kron(A_k, B_k) to (d_out, d_in).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..init.kronecker import (
    KroneckerShape,
    RankRule,
    allocate_budget,
    choose_factor_shape,
    kpsvd,
    kron_sum,
    rank_criteria,
    select_rank,
)
from ..init.svd import SVDInit
from ..kernels._dispatch import autocast_dtype, autocast_off
from .base import FrozenBase, MethodAdapter, zeros_like_shape
from .config import SpecPeftConfig
from .geometry import LayerGeometry
from .soka_function import KroneckerDeltaFunction, b_first


@dataclass
class SoKAConfig(SpecPeftConfig):
    """SoKA options.

    Attributes:
        r: fixed number of Kronecker components per layer; None selects it per layer by `rank_rule`.
        rank_pattern: per-module r, keyed by module-name suffix or regex (full match); wins over `r`.
        rank_rule: how the energy and elbow ranks combine: "min" (prune a component if either criterion calls it
            negligible), "max" (only if both do), "energy" or "elbow" alone.
        energy_threshold: τ of the energy rank, min{k : Σ_{i≤k} σ_i² ≥ τ‖W‖_F²} over the spectrum of R(W).
        elbow_log: find the elbow on log σ instead of σ.
        max_rank: clamp on the selected rank (None: `spectrum_size`). The default 1 is the paper's budget: 0.99M
            parameters on LLaMA2-7B ≈ one 64×64 ⊗ 64×64 component (8,192) per q/k/v/o matrix (spec §2.5). On
            pretrained weights the clamp decides every layer (τ = 0.9 needs more than 64 σ; elbows fall at 5–30),
            so raise it (None: no clamp) to let energy/elbow choose, with `param_budget` capping the total. Each component adds 2 stacked Kronecker
            products to the forward, about 2·(n1·m2·(n2 + m1))/(d_out·d_in) of the base layer's FLOPs (6 % for
            64×64 ⊗ 64×64 on 4096×4096, 21 % for 16×16 ⊗ 24×24 on 384×384): fwd+bwd ÷ frozen base is ≈ 1.1 at
            r = 1, 1.3 at r = 2 and 1.5 at r = 4 on 4096² (benchmarks/soka_speed.py).
        spectrum_size: how many leading σ of R(W) the selection sees (the energy rank is capped by it).
        param_budget: optional total trainable parameters over all adapted layers; when the selected ranks exceed
            it, components are dropped globally, lowest captured energy per parameter first (each layer keeps one).
        svd: how the SVD of R(W) is computed; the randomized default falls back to a full SVD for small matrices.

    Train A and B with weight decay 0: decay pulls the principal components toward zero (spec §2.10).
    """

    METHOD = "SOKA"

    r: Optional[int] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    rank_rule: RankRule = "min"
    energy_threshold: float = 0.9
    elbow_log: bool = False
    max_rank: Optional[int] = 1
    spectrum_size: int = 64
    param_budget: Optional[int] = None
    svd: SVDInit = field(default_factory=lambda: SVDInit(kind="randomized"))

    def validate(self) -> None:
        if self.r is not None and self.r < 1:
            raise ValueError(f"SoKAConfig.r={self.r}: must be ≥ 1 (or None to select the rank per layer).")
        if not 0.0 < self.energy_threshold <= 1.0:
            raise ValueError(f"SoKAConfig.energy_threshold={self.energy_threshold}: must be in (0, 1], e.g. 0.9.")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"SoKAConfig.max_rank={self.max_rank}: must be ≥ 1 or None.")
        if self.spectrum_size < 1:
            raise ValueError(f"SoKAConfig.spectrum_size={self.spectrum_size}: must be ≥ 1 (e.g. 64).")
        if self.param_budget is not None and self.param_budget < 1:
            raise ValueError(f"SoKAConfig.param_budget={self.param_budget}: must be ≥ 1 or None (no budget).")
        if self.param_budget is not None and self.max_rank == 1 and self.r is None and not self.rank_pattern:
            raise ValueError(
                f"SoKAConfig.param_budget={self.param_budget} has no effect with max_rank=1: every selected rank is "
                "clamped to 1 and the budget never drops a layer's last component. Set max_rank=None (or a cap > 1) "
                "to let energy/elbow choose within the budget."
            )
        for key, rank in self.rank_pattern.items():
            if rank < 1:
                raise ValueError(f"SoKAConfig.rank_pattern[{key!r}]={rank}: ranks must be ≥ 1.")

    def rank_for(self, name: str) -> Optional[int]:
        """The fixed rank for module `name` (rank_pattern, then r), or None for per-layer selection."""
        key = self._pattern_key(name)
        return self.r if key is None else self.rank_pattern[key]

    def rank_source(self, name: str) -> str:
        """The option that sets module `name`'s fixed rank, for error messages."""
        key = self._pattern_key(name)
        return "SoKAConfig.r" if key is None else f"SoKAConfig.rank_pattern[{key!r}]"

    def _pattern_key(self, name: str) -> Optional[str]:
        return next((key for key in self.rank_pattern
                     if name == key or name.endswith("." + key) or re.fullmatch(key, name)), None)


class SoKAAdapter(MethodAdapter):
    """Trainable Kronecker factors A (r, m1, n1), B (r, m2, n2) and their initial values A0, B0 (buffers).

    `shape` holds the factor shapes and the zero-padding of the (d_out, d_in) weight matrix; `sigma` and
    `captured_energy` (Σ_{k≤r} σ_k² / ‖W‖_F²) describe the KPSVD and are saved in the layer record.
    """

    expensive_init = True
    # On an H100 (bf16, fwd+bwd) the torch path beat the Triton one at 4096² and 4096×11008, T ∈ {1024, 4096}:
    # benchmarks/results/speed_cuda.md. Triton stays available with kernel_backend="triton".
    triton_by_default = False

    def __init__(
        self,
        geometry: LayerGeometry,
        shape: KroneckerShape,
        A: Tensor,
        B: Tensor,
        sigma: Optional[list[float]] = None,
        total_energy: Optional[float] = None,
    ) -> None:
        super().__init__(geometry)
        self.shape = shape
        self.A = nn.Parameter(A.float().clone())
        self.B = nn.Parameter(B.float().clone())
        self.register_buffer("A0", A.float().clone())
        self.register_buffer("B0", B.float().clone())
        self.sigma = sigma
        self.total_energy = total_energy
        self.rank_criteria: Optional[tuple[int, int]] = None  # (r_E, r_elbow) when the rank was selected here

    @classmethod
    def create(
        cls, geometry: LayerGeometry, config: SoKAConfig, weight: Tensor | None, record: dict | None, name: str = ""
    ) -> SoKAAdapter:
        d_out, d_in = geometry.matrix_shape
        criteria = None  # (r_E, r_elbow) of the selection, kept for the record
        if record:
            shape = KroneckerShape.from_record(record, (d_out, d_in))
            rank = int(record["r"])
            if "rank_energy" in record:
                criteria = (int(record["rank_energy"]), int(record["rank_elbow"]))
        else:
            shape = choose_factor_shape(d_out, d_in)
            rank = config.rank_for(name)
        if rank is not None and rank > shape.max_components:
            raise ValueError(
                f"SoKA layer '{name}': r={rank} exceeds the {shape.max_components} Kronecker components of its "
                f"{d_out}×{d_in} weight with factors {shape.a_shape}⊗{shape.b_shape}, set by "
                f"{config.rank_source(name)}. Lower it, or add a rank_pattern entry for this layer."
            )
        if weight is None:
            if rank is None:
                raise ValueError(
                    f"SoKA layer '{name}': no saved rank to rebuild from. Load adapters with the adapter_config.json "
                    "they were saved with (it records each layer's rank and factor shapes), or set SoKAConfig.r."
                )
            zeros = zeros_like_shape
            adapter = cls(geometry, shape, zeros((rank, *shape.a_shape)), zeros((rank, *shape.b_shape)))
            if record:
                adapter.sigma, adapter.total_energy = record.get("sigma"), record.get("total_energy")
                adapter.rank_criteria = criteria
            return adapter
        matrix = weight.reshape(d_out, d_in)  # (out, in/groups, *k) -> (out, in/groups·prod(k))
        if rank is None:
            factors = kpsvd(matrix, shape, min(config.spectrum_size, shape.max_components), config.svd)
            rank = select_rank(factors.sigma, factors.total_energy, config.rank_rule, config.energy_threshold,
                               config.max_rank, config.elbow_log)
            criteria = rank_criteria(factors.sigma, factors.total_energy, config.energy_threshold, config.elbow_log)
        else:
            factors = kpsvd(matrix, shape, rank, config.svd)
        if not float(factors.sigma[0]) > 0.0:
            warnings.warn(
                f"SoKA layer '{name}': its weight is zero, so its Kronecker factors start at zero and get no gradient "
                "(each factor's gradient is a product with the other). Exclude it with `exclude_modules`."
            )
        sigma = [float(s) for s in factors.sigma[:rank]]
        adapter = cls(geometry, shape, factors.A[:rank], factors.B[:rank], sigma, factors.total_energy)
        adapter.rank_criteria = criteria
        return adapter

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def captured_energy(self) -> Optional[float]:
        """Σ_{k≤r} σ_k² / ‖W‖_F² = 1 − ‖W_res‖²/‖W‖², the fraction of the weight the initial factors hold.

        For a zero-padded layer this is measured on the padded matrix: a lower bound of the cropped fraction.
        """
        if self.sigma is None or self.total_energy is None:
            return None
        return sum(s * s for s in self.sigma) / self.total_energy if self.total_energy > 0 else 0.0

    def record(self) -> dict:
        record = {"r": self.rank, **self.shape.to_record()}
        if self.sigma is not None and self.total_energy is not None:
            record.update(energy=self.captured_energy, sigma=list(self.sigma), total_energy=self.total_energy)
        if self.rank_criteria is not None:
            record.update(rank_energy=self.rank_criteria[0], rank_elbow=self.rank_criteria[1])
        return record

    def truncate_(self, rank: int) -> None:
        """Keep the leading `rank` components (they are sorted by σ); used by the global parameter budget."""
        if rank >= self.rank:
            return
        with torch.no_grad():
            for name in ("A", "B"):
                old = getattr(self, name)
                setattr(self, name, nn.Parameter(old[:rank].clone(), requires_grad=old.requires_grad))
            self.A0 = self.A0[:rank].clone()
            self.B0 = self.B0[:rank].clone()
        if self.sigma is not None:
            self.sigma = self.sigma[:rank]

    def _stacked_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The 2r components of ΔW: [(A − A0); A0] and [B; (B − B0)], all exactly zero at init."""
        a = torch.cat([self.A - self.A0, self.A0]).to(dtype)  # 2 × (r, m1, n1) -> (2r, m1, n1)
        b = torch.cat([self.B, self.B - self.B0]).to(dtype)  # 2 × (r, m2, n2) -> (2r, m2, n2)
        return a, b

    def delta_weight(self) -> Tensor:
        d_out, d_in = self.geometry.matrix_shape
        delta = kron_sum(*self._stacked_factors(torch.promote_types(self.A.dtype, torch.float32)))  # (m1·m2, n1·n2)
        return delta[:d_out, :d_in].reshape(self.geometry.weight_shape)  # crop, then (out, in/groups, *k)

    def _factored(self, x: Tensor, base_out: Tensor | None = None) -> Tensor:
        """x ΔWᵀ (+ base_out) by the reshape identity over the 2r components (`KroneckerDeltaFunction`), no ΔW."""
        d_out, d_in = self.geometry.matrix_shape
        pad_out, pad_in = self.shape.padding
        device = x.device.type
        dtype = autocast_dtype(x)
        tokens = x.reshape(-1, d_in).to(dtype)  # (..., d_in) -> (T, d_in)
        if pad_in:
            tokens = F.pad(tokens, (0, pad_in))  # (T, d_in) -> (T, n1·n2): zero columns meet W's zero padding
        fused = None if base_out is None or pad_out else base_out.reshape(-1, d_out)  # (..., d_out) -> (T, d_out)
        if fused is not None and (fused.dtype != dtype or not fused.is_contiguous()):
            fused = None
        if b_first(self.shape.a_shape, self.shape.b_shape):
            factors, transposed = (self.A, self.B, self.A0, self.B0), False
        else:  # A first = B first on the transposed problem, with ΔW = Σ A⊗(B − B⁰) + (A − A⁰)⊗B⁰
            factors, transposed = (self.B, self.A, self.B0, self.A0), True
        with autocast_off(device):  # the function runs in `dtype` throughout
            y = KroneckerDeltaFunction.apply(tokens.contiguous(), *factors, fused, transposed)  # (T, m1·m2)
        if pad_out:
            y = y[:, :d_out]  # (T, m1·m2) -> (T, d_out)
        y = y.reshape(*x.shape[:-1], d_out)  # (T, d_out) -> (..., d_out)
        return y if base_out is None or fused is not None else base_out + y

    def _triton_factored(self, x: Tensor, base: FrozenBase, with_base: bool) -> Optional[Tensor]:
        """The fused Triton op `kernels.kronecker_linear` on the 2r stacked components when Triton is forced (config or
        `SPECPEFT_KERNELS`; "auto" runs torch) and the base is a plain nn.Linear; None otherwise."""
        if not self.geometry.is_plain_linear or self.kernel_path(x, base.module.weight) != "triton":
            return None
        return kernels.kronecker_linear(x, *self._stacked_factors(torch.float32), base_out=base(x) if with_base else
                                        None, out_features=self.geometry.matrix_shape[0], backend="triton")

    def delta_forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        if self.geometry.is_conv:
            return super().delta_forward(x, base)
        fused = self._triton_factored(x, base, with_base=False)
        return self._factored(x) if fused is None else fused

    def forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        if self.geometry.is_conv:
            return base.forward_with_delta(x, self.delta_weight())
        fused = self._triton_factored(x, base, with_base=True)
        return self._factored(x, base(x)) if fused is None else fused  # the base output is added in the last GEMM

    @classmethod
    def after_injection(cls, adapters: dict[str, MethodAdapter], config: SoKAConfig) -> None:
        """Apply `param_budget` across all layers just initialized, and save the final ranks in the records."""
        if config.param_budget is None:
            return
        layers = {key: a for key, a in adapters.items() if isinstance(a, SoKAAdapter) and a.sigma is not None}
        costs = [a.shape.params_per_component for a in layers.values()]
        if sum(a.rank * c for a, c in zip(layers.values(), costs)) <= config.param_budget:
            return
        ranks = allocate_budget([torch.tensor(a.sigma) for a in layers.values()],
                                [a.total_energy or 0.0 for a in layers.values()], costs, config.param_budget)
        for (key, adapter), rank in zip(layers.items(), ranks):
            adapter.truncate_(rank)
            config.layer_records[key] = {**config.layer_records.get(key, {}), **adapter.record()}

    def extra_repr(self) -> str:
        energy = self.captured_energy
        text = f"r={self.rank}, factors={self.shape.a_shape}⊗{self.shape.b_shape}, padding={self.shape.padding}"
        return text if energy is None else f"{text}, energy={energy:.3f}"


REGISTRATION = dict(
    name="soka",
    config_cls=SoKAConfig,
    adapter_cls=SoKAAdapter,
    description="SoKA: sums of Kronecker products initialized by KPSVD of W (ranks by energy/elbow).",
)
