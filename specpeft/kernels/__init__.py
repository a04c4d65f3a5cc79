"""Fused adapter kernels: Triton on CUDA when available, the torch reference otherwise (design.md §5).

Each family has a public op that dispatches, a `*_reference` with the same signature (the CPU path and the
oracle; `kronecker_linear`'s torch path is `kronecker_torch.kronecker_linear_bmm` on CUDA and
`kronecker_gemm.kronecker_linear_gemm` on CPU), and a
`torch.autograd.Function` with a hand-written backward:

    lowrank_linear      y = x Wᵀ + b + ((x V) ⊙ s) Uᵀ                    SVFit, LoRA shapes
    kronecker_linear    y = base + x (Σ_k A_k ⊗ B_k)ᵀ                      SoKA
    tucker_linear       y = x (W + unfold(𝒢 ×_k U_k))ᵀ + b                 TeRA (materialized or factored)
    snella_linear       y = x (W + s·K_eff)ᵀ + b, K generated tile by tile  SNELLA / SNELL

plus `kronecker_merged_linear`, y = x (W + Σ_k A_k ⊗ B_k)ᵀ + b, torch only (one GEMM on the merged weight, factor
gradients without dΔ: TeRA's merged path for a rank-1 last mode).

Backend choice (`kernel_backend`): the op's `backend=` argument, then `set_kernel_backend` / `use_kernel_backend`
(the process-wide flag a config sets), then the environment variable `SPECPEFT_KERNELS` ∈ {auto, triton, torch};
"auto" runs Triton on CUDA tensors when triton imports. Forcing "triton" on CPU tensors requires the Triton
interpreter (`TRITON_INTERPRET=1` before triton is imported), which is how the kernels are tested without a GPU.
"""

from ._dispatch import (
    ENV_VAR,
    HAS_TRITON,
    Backend,
    BackendChoice,
    interpreting,
    kernel_backend,
    requested_backend,
    set_kernel_backend,
    use_kernel_backend,
)
from .kronecker import KroneckerLinearFunction, kronecker_linear, kronecker_linear_reference
from .kronecker_torch import KroneckerMergedFunction, kronecker_factor_grads, kronecker_merged_linear
from .lowrank import LowRankLinearFunction, lowrank_linear, lowrank_linear_reference
from .snella import SNELLALinearFunction, snella_kernel_matrix, snella_linear, snella_linear_reference
from .tucker import (
    TuckerMaterializedFunction,
    tucker_delta,
    tucker_linear,
    tucker_linear_reference,
    tucker_prefers_factored,
)

__all__ = [
    "ENV_VAR",
    "HAS_TRITON",
    "Backend",
    "BackendChoice",
    "KroneckerLinearFunction",
    "KroneckerMergedFunction",
    "LowRankLinearFunction",
    "SNELLALinearFunction",
    "TuckerMaterializedFunction",
    "interpreting",
    "kernel_backend",
    "kronecker_factor_grads",
    "kronecker_linear",
    "kronecker_linear_reference",
    "kronecker_merged_linear",
    "lowrank_linear",
    "lowrank_linear_reference",
    "requested_backend",
    "set_kernel_backend",
    "snella_kernel_matrix",
    "snella_linear",
    "snella_linear_reference",
    "tucker_delta",
    "tucker_linear",
    "tucker_linear_reference",
    "tucker_prefers_factored",
    "use_kernel_backend",
]
