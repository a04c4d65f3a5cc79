"""TeRA's training op: y = base(x; W₀ + Δ) with a hand-written backward that saves only x and the vectors.

Split from tera.py (the adapter) because it is the one piece with its own math: which contraction gives the
vector gradients (`GradPlan`) and how the merged weight is rebuilt instead of saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .. import kernels
from ..init.tucker import last_mode_outer, unmerged_core
from .base import FrozenBase
from .geometry import forward_with_weight

if TYPE_CHECKING:
    from .tera import TeRAAdapter

LARGE_WEIGHT = 1 << 22  # m·n from which W₀ + Δ is built without a separate Δ buffer (16 MB in fp32)

GradPlan = Literal["dense", "projected"]


class TeRALinearFunction(torch.autograd.Function):
    """y = base(x; W₀ + Δ) (`merge_base`) or y = x Δᵀ, saving only x and the vectors (Δ, W₀ + Δ never saved).

    Forward: W₀ + Δ is built once (`TeRAAdapter._merged_weight`: Δ = P Ũ_Nᵀ with P = 𝒢 ×_{l<N} Ũ_l, added to W₀
    through a strided view, or per out-index a_N into one buffer for large weights) and the base op runs on it.
    Backward: dX = dY (W₀ + Δ) on the rebuilt merged weight, and the vector gradients by `plan`:

    * "dense": dΔ = dYᵀX (one GEMM, written into the freed W₀ + Δ buffer when it can), contracted as
      dP = Σ_{a_N, b_N} dΔ Ũ_N and dŨ_N = Σ_{a', b'} dΔ P (2·m·n·R_N MACs; `kernels.tucker_vector_grads_dense`);
    * "projected": dΔ is never formed. With the unmerged mode k, P_k = 𝒢 ×_{l≠k} Ũ_l, Z = X ×_{b_k} Ũ_k:
      dP_k = Σ_{t, a_k} dY ⊗ Z, dZ = dY ×_{a_{≠k}} P_k, dŨ_k = Σ_{t, b_{≠k}} X ⊗ dZ
      (2·T·(n·m_k·R_k + (n/n_k)·R_k·m) MACs: a fraction R_k/n_k of a GEMM each).

    The small network (P, Ũ) is then back-propagated to λ, μ by autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, adapter: TeRAAdapter, base: FrozenBase, merge_base: bool, plan: GradPlan,
                *vectors: Tensor) -> Tensor:
        with torch.no_grad():
            weight = adapter._merged_weight(base if merge_base else None, vectors)
            if merge_base:
                out = forward_with_weight(base.module, base.geometry, x, weight)
            else:
                out = torch.nn.functional.linear(x, weight.to(x.dtype))
        ctx.adapter, ctx.base, ctx.merge_base, ctx.plan = adapter, base, merge_base, plan
        ctx.save_for_backward(x, *vectors)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *vectors = ctx.saved_tensors
        adapter: TeRAAdapter = ctx.adapter
        shape = adapter.shape
        g2 = grad_out.reshape(-1, shape.out_features)  # (..., m) -> (T, m)
        grad_x = None
        if ctx.needs_input_grad[0]:
            with torch.no_grad():
                weight = adapter._merged_weight(ctx.base if ctx.merge_base else None, vectors)
            grad_x = (g2 @ weight.to(g2.dtype)).reshape(x.shape)  # (T, m)·(m, n) -> (..., n)
            workspace = weight  # no longer needed: dΔ may be written into it (one fewer m·n allocation)
        else:
            workspace = None
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[5:]) if need]
        if not wanted:
            return (grad_x, None, None, None, None, *([None] * len(vectors)))
        if ctx.plan != "dense":
            workspace = None
        x2 = x.reshape(-1, shape.in_features)  # (..., n) -> (T, n)
        leaves = [v.detach().requires_grad_(True) for v in vectors]
        with torch.enable_grad():  # the small network (P, Ũ) only; the big contractions run without a graph
            core, factors = adapter._scaled(tuple(leaves), leaves[0].dtype)
            k = shape.order - 1 if ctx.plan == "dense" else adapter.projected_mode
            merged = last_mode_outer(core, factors, shape) if ctx.plan == "dense" else unmerged_core(
                core, factors, shape, k)
            outputs = (merged, factors[k])
        small = shape.out_features * shape.in_features < LARGE_WEIGHT
        with torch.no_grad():
            if ctx.plan == "dense":
                grads = kernels.tucker.tucker_vector_grads_dense(
                    g2, x2, merged.detach(), factors[k].detach(), shape, workspace, small=small)
            else:
                grads = kernels.tucker.tucker_vector_grads_projected(
                    g2, x2, merged.detach(), factors[k].detach(), shape, k)
        found = torch.autograd.grad(outputs, [leaves[i] for i in wanted], grads, allow_unused=True)
        vector_grads = [None] * len(vectors)
        for i, grad in zip(wanted, found):
            vector_grads[i] = torch.zeros_like(leaves[i]) if grad is None else grad
        return (grad_x, None, None, None, None, *vector_grads)
