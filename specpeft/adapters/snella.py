"""SNELLA: kernelized sparse fine-tuning with bi-level parameter competition (arXiv 2510.24037; SNELL, 2411.01800).

Per adapted layer (weight viewed as an (m, n) matrix, conv kernels as `(out, in/groups·k…)`):

    K = Σ_h c_h ‖B_h[j] − A_h[i]‖ + α softmax_j(D[:, i]/γ) + β      A = in_qs (H, n, d/H), B = out_qs (H, m, d/H)
    W' = W0 + s · K_eff,   K_eff = K ⊙ |K|_sg ⊙ 1[top-k |K|]  (mask_mode "code") or K ⊙ 1[top-k |K|] ("binary")

Training path: one autograd Function (snella_function.py) that never saves an m×n tensor, or, when the kernels
dispatch to Triton (`kernel_backend` / `SPECPEFT_KERNELS` / CUDA tensors) on a plain nn.Linear with p = 2, the fused
op `kernels.snella_linear`, given the exact top-k mask (computed here, as the torch path does) as a bit mask.

k, the kept count, is a persistent int64 buffer (`kept`): it travels in the adapter checkpoint, so a reloaded
model evaluates with the sparsity the allocator (`SNELLAAllocator`, snella_allocator.py) chose, not the initial
one (spec §3.8 pitfall 2). The top-k is exact, ties included (spec §3.8 pitfall 1).

Init (a deliberate departure from the reference code, whose ΔW at init is ≈1e-5 but not zero): the factors and
α, γ, β are initialized as in the code (kaiming-uniform(a=√5); 1, 1, 0), and a trainable scalar gate `s` starts at
`init_scale = 0.0`, so the output at init equals the base output exactly in every dtype (like LoRA's B = 0).
In "code" mode no other exact-zero init can train: K_eff = 0 needs K = 0 on kept entries, where its gradient
(∝ |K|) vanishes. `init_scale=1.0` reproduces the reference's non-zero start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels._dispatch import autocast_off
from .base import FrozenBase, MethodAdapter, zeros_like_shape
from .config import SpecPeftConfig
from .geometry import LayerGeometry
from .snella_function import LayerPlan, snella_apply
from .snella_kernel import KernelKind, KernelSpec, MaskMode, effective_kernel, kept_count, kernel_matrix, topk_mask


@dataclass
class SNELLAConfig(SpecPeftConfig):
    """SNELLA / SNELL options (defaults: the reference scripts' SNELLA-32, spec §3.3).

    Attributes:
        low_rank_dim: d; each head's factors have width d / heads (trainables per layer: d·(m + n) + 4).
        heads: number of kernel heads H, with coefficients c_h = head_coeff·(−1)^h.
        head_coeff: |c_h| (the reference's frozen `SCALE_FACTOR_fc` = 0.1).
        kernel: "snella" (mixture: D + α softmax(D/γ) + β, p = 2) or "snell" (D only, any `norm_p`).
        norm_p: the distance's p; only "snell" accepts p ≠ 2.
        mask_mode: "code" (K ⊙ |K| on kept entries, the reference code) or "binary" (K on kept entries). With
            the exact-zero gate, "code" starts slowly: its factor gradients scale with s·|K| (|K| ≈ 1e-3), below
            AdamW's ε early on. MiniLM / Rotten Tomatoes, 80 steps: code 0.600, binary 0.763, code with
            init_scale=1 0.767, head only 0.587 (examples/snella_minilm.py).
        init_sparsity: fraction of entries zeroed at the start (0.01 VTAB, 0 FGVC in the scripts).
        target_sparsity: the allocator's final average sparsity (per-task in the scripts: 0.16–0.93).
        max_layer_sparsity: the allocator never sparsifies a layer beyond this. 1.0 (the reference) lets a layer
            reach 0 kept entries, after which its factors get no gradient and it never recovers; e.g. 0.95 keeps
            every layer competing.
        init_scale: start value of the trainable gate s; 0.0 gives exact init invariance, 1.0 the reference start.
        adapter_dropout: dropout on the adapter's input in training (reference: 0.1).
        drop_path: per-sample DropPath on the adapter's output in training (reference: 0.1).
        total_steps: allocator schedule length T (None: the Trainer's max_steps, or pass it to the allocator).
        init_warmup: t_i, steps at the initial budget before the cubic decrease.
        final_warmup: t_f, final steps at the target budget.
        mask_interval: re-allocate every this many steps during the decrease.
        beta1: EMA factor of the sensitivity |θ ⊙ ∇θ|.
        beta2: EMA factor of its uncertainty.
    """

    METHOD = "SNELLA"

    low_rank_dim: int = 32
    heads: int = 2
    head_coeff: float = 0.1
    kernel: KernelKind = "snella"
    norm_p: float = 2.0
    mask_mode: MaskMode = "code"
    init_sparsity: float = 0.01
    target_sparsity: float = 0.8
    max_layer_sparsity: float = 1.0
    init_scale: float = 0.0
    adapter_dropout: float = 0.0
    drop_path: float = 0.0
    total_steps: Optional[int] = None
    init_warmup: int = 0
    final_warmup: int = 0
    mask_interval: int = 1
    beta1: float = 0.85
    beta2: float = 0.85

    def validate(self) -> None:
        name = type(self).__name__
        if self.heads < 1:
            raise ValueError(f"{name}.heads={self.heads}: must be ≥ 1 (the reference uses 2).")
        if self.low_rank_dim < self.heads or self.low_rank_dim % self.heads:
            raise ValueError(
                f"{name}.low_rank_dim={self.low_rank_dim} must be a positive multiple of heads={self.heads} "
                f"(each head gets low_rank_dim / heads columns), e.g. "
                f"low_rank_dim={max(1, self.low_rank_dim // self.heads) * self.heads}."
            )
        if self.kernel == "snella" and self.norm_p != 2.0:
            raise ValueError(f"{name}.norm_p={self.norm_p}: the 'snella' mixture kernel uses p = 2; set kernel='snell'.")
        if self.norm_p < 1.0:
            raise ValueError(f"{name}.norm_p={self.norm_p}: must be ≥ 1.")
        for field_name in ("init_sparsity", "target_sparsity", "max_layer_sparsity"):
            value = getattr(self, field_name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}.{field_name}={value}: a sparsity is the fraction zeroed, in [0, 1].")
        for field_name in ("adapter_dropout", "drop_path"):
            value = getattr(self, field_name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}.{field_name}={value}: must be in [0, 1).")
        for field_name in ("target_sparsity", "init_sparsity"):  # the budget runs from init_ to target_sparsity
            if self.max_layer_sparsity < getattr(self, field_name):
                raise ValueError(
                    f"{name}.max_layer_sparsity={self.max_layer_sparsity} is below {field_name}="
                    f"{getattr(self, field_name)}: no allocation could keep that few entries. Raise it "
                    "(1.0 = no floor)."
                )
        for field_name in ("beta1", "beta2"):
            value = getattr(self, field_name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}.{field_name}={value}: an EMA factor in (0, 1), e.g. 0.85.")
        if self.mask_interval < 1 or self.init_warmup < 0 or self.final_warmup < 0:
            raise ValueError(f"{name}: mask_interval must be ≥ 1 and init_warmup/final_warmup ≥ 0.")
        if self.total_steps is not None and self.total_steps <= self.init_warmup + self.final_warmup:
            raise ValueError(
                f"{name}.total_steps={self.total_steps} must exceed init_warmup + final_warmup "
                f"= {self.init_warmup + self.final_warmup}."
            )

    def kernel_spec(self) -> KernelSpec:
        coeffs = tuple(self.head_coeff * (-1) ** h for h in range(self.heads))
        return KernelSpec(kernel=self.kernel, mask_mode=self.mask_mode, coeffs=coeffs, norm_p=float(self.norm_p))


class SNELLAAdapter(MethodAdapter):
    """Trainable kernel factors (in_qs, out_qs), mixture scalars (alpha, gamma, beta; "snella" only), gate `scale`,
    and the persistent kept-count buffer `kept`.

    Shapes: in_qs (H, n, d/H), out_qs (H, m, d/H), scalars (), kept () int64, with (m, n) the weight matrix shape.
    """

    def __init__(
        self, geometry: LayerGeometry, low_rank_dim: int, heads: int, spec: KernelSpec, kept: int,
        init_scale: float = 0.0, adapter_dropout: float = 0.0, drop_path: float = 0.0,
    ) -> None:
        super().__init__(geometry)
        m, n = geometry.matrix_shape
        width = low_rank_dim // heads
        self.spec = spec
        self.low_rank_dim, self.heads = low_rank_dim, heads
        self.in_qs = nn.Parameter(zeros_like_shape((heads, n, width)))
        self.out_qs = nn.Parameter(zeros_like_shape((heads, m, width)))
        # Scalars are stored as shape-(1,) tensors: FSDP2 `fully_shard` cannot shard 0-d parameters.
        if spec.kernel == "snella":
            self.alpha = nn.Parameter(torch.tensor([1.0]))
            self.gamma = nn.Parameter(torch.tensor([1.0]))
            self.beta = nn.Parameter(torch.tensor([0.0]))
        else:
            self.alpha = self.gamma = self.beta = None
        self.scale = nn.Parameter(torch.tensor([float(init_scale)]))
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.int64))
        self.adapter_dropout, self.drop_path = adapter_dropout, drop_path

    @classmethod
    def create(
        cls, geometry: LayerGeometry, config: SNELLAConfig, weight: Tensor | None, record: dict | None, name: str = ""
    ) -> SNELLAAdapter:
        record = record or {}
        low_rank_dim = record.get("low_rank_dim", config.low_rank_dim)
        heads = record.get("heads", config.heads)
        numel = math.prod(geometry.matrix_shape)
        adapter = cls(
            geometry, low_rank_dim, heads, config.kernel_spec(), kept_count(config.init_sparsity, numel),
            config.init_scale, config.adapter_dropout, config.drop_path,
        )
        if weight is not None:  # fresh init; when loading, the checkpoint overwrites the zeros (kept included)
            adapter.reset_factors()
        return adapter

    def reset_factors(self) -> None:
        """kaiming_uniform_(a=√5) on the 3-D factors: bound 1/√(n·d/H) and 1/√(m·d/H) (fan_in = dim1·dim2)."""
        nn.init.kaiming_uniform_(self.in_qs, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.out_qs, a=math.sqrt(5))

    def record(self) -> dict:
        return {"low_rank_dim": self.low_rank_dim, "heads": self.heads}

    # -- sparsity -----------------------------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return math.prod(self.geometry.matrix_shape)

    @property
    def sparsity(self) -> float:
        """Fraction of entries zeroed, 1 − k/N."""
        return 1.0 - int(self.kept) / self.numel

    def set_kept(self, kept: int) -> None:
        """Set the kept count k (clipped to [0, N]); the buffer is what save/load carries."""
        self.kept.fill_(min(max(int(kept), 0), self.numel))

    def set_sparsity(self, sparsity: float) -> None:
        self.set_kept(kept_count(sparsity, self.numel))

    # -- math ---------------------------------------------------------------------------------------------------

    def _plan(self, base: Optional[FrozenBase] = None) -> LayerPlan:
        return LayerPlan(self.spec, int(self.kept), self.geometry, base)

    def _kernel_scalars(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(α, γ, β) as 0-d views of the shape-(1,) parameters (None for the SNELL distance kernel)."""
        if self.alpha is None:
            return None, None, None
        return self.alpha[0], self.gamma[0], self.beta[0]

    def kernel_matrix(self) -> Tensor:
        """The dense kernel K (m, n), before masking; differentiable; in the factors' dtype under autocast too (its
        top-k is the mask the training Function applies)."""
        with autocast_off(self.in_qs.device.type):
            return kernel_matrix(self.in_qs, self.out_qs, *self._kernel_scalars(), self.spec)

    def mask(self) -> Tensor:
        """The boolean top-k mask (m, n) of the current factors: exactly `kept` entries.

        K is built block by block under no_grad, bit-identical to the training Function's K, so this is the mask
        that Function applies (ties at τ included).
        """
        with torch.no_grad():
            return topk_mask(self.kernel_matrix().abs_(), int(self.kept))[0]

    def delta_weight(self) -> Tensor:
        K = self.kernel_matrix()
        mask = topk_mask(K.detach().abs(), int(self.kept))[0]
        delta = self.scale[0] * effective_kernel(K, mask, self.spec.mask_mode)  # (m, n)
        return delta.reshape(self.geometry.weight_shape)  # (m, n) -> (out, in/g, *k)

    def _drop_path(self, y: Tensor) -> Tensor:
        """Zero the adapter output of whole samples with probability p (first dim = batch), rescale by 1/(1−p)."""
        keep = 1.0 - self.drop_path
        shape = (y.shape[0],) + (1,) * (y.dim() - 1)
        return y * y.new_empty(shape).bernoulli_(keep).div_(keep)

    def _stochastic(self) -> bool:
        return self.training and (self.adapter_dropout > 0 or self.drop_path > 0)

    # -- fused kernel path (specpeft.kernels, issue 9) ------------------------------------------------------------

    def _uses_kernel(self, x: Tensor, base: Optional[FrozenBase]) -> bool:
        """Whether `kernels.snella_linear` runs on the Triton path: a plain nn.Linear (not quantized, standard
        forward, not fan_in_fan_out), the p = 2 distance the kernels implement, and a Triton dispatch."""
        geometry = self.geometry
        if not geometry.is_plain_linear:
            return False
        if self.spec.norm_p != 2.0:
            return False
        weight = base.module.weight if base is not None else None
        return self.kernel_path(x, self.in_qs, weight) == "triton"

    def _kernel_apply(self, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
        """x ([W0 +] s·K_eff)ᵀ [+ b] through the Triton op, with the same exact top-k as the torch Function.

        The kernels regenerate K with their own rounding, so a threshold |K| > τ could keep a few entries more or
        fewer than `kept` wherever neighbouring |K| values are closer than that rounding (always, on large layers);
        the mask is therefore passed explicitly (packed to 1 bit per entry inside the op). A dense layer (kept = N)
        needs none: every entry passes |K| > −∞.

        `materialize=True`: W + s·K_eff is written once per pass (transient, never saved) and multiplied by cuBLAS;
        on an H100 that trained 1.2-10× faster than regenerating K inside the GEMM at every T from 512 to 16384
        (`benchmarks/results/kernels_cuda.md`, "kernel, materialize" vs "kernel").
        """
        keep_mask = self.mask() if int(self.kept) < self.numel else None  # (m, n) bool, transient
        alpha, gamma, beta = self._kernel_scalars()
        return kernels.snella_linear(
            x, self.in_qs, self.out_qs, self.scale[0], None, alpha=alpha, gamma=gamma, beta=beta,
            coeffs=self.spec.coeffs, kernel=self.spec.kernel, mask_mode=self.spec.mask_mode, weight=weight,
            bias=bias, keep_mask=keep_mask, materialize=True, backend="triton",
        )

    def delta_forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        use_kernel = self._uses_kernel(x, base)  # decided on the undropped x: same device and dtype
        if self.training and self.adapter_dropout > 0:
            x = F.dropout(x, self.adapter_dropout, training=True)
        if use_kernel:
            y = self._kernel_apply(x)
        else:
            y = snella_apply(x, self.in_qs, self.out_qs, *self._kernel_scalars(), self.scale[0], self._plan(base))
        if self.training and self.drop_path > 0:
            y = self._drop_path(y)
        return y

    def forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        geometry, module = self.geometry, base.module
        fusable = geometry.kind == "linear" and geometry.standard_forward and not geometry.quantized
        frozen = not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad)
        if fusable and frozen and not self._stochastic():
            # One GEMM on W0 + Δ (merge on the fly); neither op saves an m×n tensor of its own.
            if self._uses_kernel(x, base):
                return self._kernel_apply(x, module.weight, module.bias)
            return snella_apply(x, self.in_qs, self.out_qs, *self._kernel_scalars(), self.scale[0],
                                self._plan(), weight=module.weight, bias=module.bias)
        return base(x) + self.delta_forward(x, base)

    def extra_repr(self) -> str:
        return (f"d={self.low_rank_dim}, heads={self.heads}, kernel={self.spec.kernel}, "
                f"mask_mode={self.spec.mask_mode}, kept={int(self.kept)}/{self.numel}")


REGISTRATION = dict(
    name="snella",
    config_cls=SNELLAConfig,
    adapter_cls=SNELLAAdapter,
    description="SNELLA: sparse tuning of a kernelized low-rank update (exact top-k mask, bi-level budget allocator).",
)
