"""TeRA's training op: y = base(x; W₀ + Δ) with a hand-written backward that saves only x and the vectors.

Split from tera.py (the adapter) because it is the one piece with its own math: which contraction gives the
vector gradients (`GradPlan`) and how the merged weight is rebuilt instead of saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

import torch
from torch import Tensor

from ..init.tucker import last_mode_delta_rows, last_mode_outer, unmerged_core
from ..kernels.tucker_grads import tucker_vector_grads_dense, tucker_vector_grads_projected
from .base import FrozenBase
from .geometry import forward_with_weight

if TYPE_CHECKING:
    from .tera import TeRAAdapter

LARGE_WEIGHT = 1 << 22  # m·n from which W₀ + Δ is built without a separate Δ buffer (16 MB in fp32)

GradPlan = Literal["dense", "projected", "kronecker"]  # "kronecker": kernels.kronecker_merged_linear, not below


def merged_weight(adapter: TeRAAdapter, base: Optional[FrozenBase], vectors: tuple[Tensor, ...]) -> Tensor:
    """W₀ + α·Δ (`base` given, in the base weight's dtype) or α·Δ (fp32), (out, in), contiguous; no autograd.

    Δ[(a', a_N), (b', b_N)] = Σ_r P[(a', b'), r] Ũ_N[(a_N, b_N), r] with P = α𝒢 ×_{l<N} Ũ_l (`last_mode_outer`):
    m·n·R_N MACs, the unfold permutation fused into the add to W₀.
    """
    shape = adapter.shape
    core, factors = adapter._scaled(tuple(vectors), vectors[0].dtype)
    outer = last_mode_outer(core, factors, shape)  # (m'·n', R_N)
    m_last, n_last, rank = shape.out_modes[-1], shape.in_modes[-1], shape.ranks[-1]
    if base is not None and shape.out_features * shape.in_features >= LARGE_WEIGHT:
        # One m·n allocation instead of two (Δ, then W₀ + Δ): page-faulting fresh large buffers costs about
        # as much as the build. Per out-index a_N: W'[a', a_N, b', :] = W₀[…] + P[a', b', :] Ũ_N[a_N, :, :]ᵀ.
        weight = base.weight()
        merged = torch.empty(shape.out_features, shape.in_features, dtype=weight.dtype, device=weight.device)
        grid = (shape.out_features // m_last, m_last, shape.in_features // n_last, n_last)  # (m', m_N, n', n_N)
        merged4, weight4 = merged.view(grid), weight.reshape(grid)
        outer3 = outer.view(grid[0], grid[2], rank)  # (m'·n', R_N) -> (m', n', R_N)
        cube = factors[-1].reshape(m_last, n_last, rank)  # (J_N, R_N) -> (m_N, n_N, R_N)
        for a_last in range(m_last):  # (m', n', R_N)·(R_N, n_N) -> (m', n', n_N), added into W₀'s layout
            torch.add(weight4[:, a_last], torch.matmul(outer3, cube[a_last].T), out=merged4[:, a_last])
        return merged
    if base is None:
        rows = last_mode_delta_rows(outer, factors[-1], shape)  # (m_N, m', n)
        # (m_N, m', n) -> (m', m_N, n) -> (m, n): row (a', a_N) = row a of Δ
        return rows.transpose(0, 1).reshape(shape.out_features, shape.in_features)
    # Small weights: one GEMM for all of Δ, laid out (a', b', a_N, b_N), added through a strided view
    # (fewer, larger ops than the per-a_N loop above; exact when Δ = 0: W₀ + 0 = W₀ bit for bit).
    grid = (shape.out_features // m_last, shape.in_features // n_last, m_last, n_last)  # (m', n', m_N, n_N)
    delta = outer @ factors[-1].T  # (m'·n', R_N)·(R_N, m_N·n_N) -> (m'·n', J_N)
    weight = base.weight()
    merged = torch.empty(shape.out_features, shape.in_features, dtype=weight.dtype, device=weight.device)
    order = (grid[0], grid[2], grid[1], grid[3])  # (m', m_N, n', n_N): W₀'s layout
    torch.add(weight.reshape(order), delta.view(grid).permute(0, 2, 1, 3), out=merged.view(order))
    return merged


class TeRALinearFunction(torch.autograd.Function):
    """y = base(x; W₀ + Δ) (`merge_base`) or y = x Δᵀ, saving only x and the vectors (Δ, W₀ + Δ never saved).

    Forward: W₀ + Δ is built once (`merged_weight`: Δ = P Ũ_Nᵀ with P = 𝒢 ×_{l<N} Ũ_l, added to W₀
    through a strided view, or per out-index a_N into one buffer for large weights) and the base op runs on it.
    Backward: dX = dY (W₀ + Δ) on the rebuilt merged weight, and the vector gradients by `plan`:

    * "dense": dΔ = dYᵀX (one GEMM, written into the freed W₀ + Δ buffer when it can), contracted as
      dP = Σ_{a_N, b_N} dΔ Ũ_N and dŨ_N = Σ_{a', b'} dΔ P (2·m·n·R_N MACs; `kernels.tucker_grads`);
    * "projected": dΔ is never formed. With the unmerged mode k, P_k = 𝒢 ×_{l≠k} Ũ_l, Z = X ×_{b_k} Ũ_k:
      dP_k = Σ_{t, a_k} dY ⊗ Z, dZ = dY ×_{a_{≠k}} P_k, dŨ_k = Σ_{t, b_{≠k}} X ⊗ dZ
      (2·T·(n·m_k·R_k + (n/n_k)·R_k·m) MACs: a fraction R_k/n_k of a GEMM each).

    The small network (P, Ũ) is then back-propagated to λ, μ by autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, adapter: TeRAAdapter, base: FrozenBase, merge_base: bool, plan: GradPlan,
                *vectors: Tensor) -> Tensor:
        if plan not in ("dense", "projected"):
            raise ValueError(f"TeRALinearFunction: plan={plan!r}; it runs 'dense' or 'projected' (the 'kronecker' plan "
                             "is kernels.kronecker_merged_linear).")
        with torch.no_grad():
            weight = merged_weight(adapter, base if merge_base else None, vectors)
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
                weight = merged_weight(adapter, ctx.base if ctx.merge_base else None, vectors)
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
                grads = tucker_vector_grads_dense(
                    g2, x2, merged.detach(), factors[k].detach(), shape, workspace, small=small)
            else:
                grads = tucker_vector_grads_projected(
                    g2, x2, merged.detach(), factors[k].detach(), shape, k)
        found = torch.autograd.grad(outputs, [leaves[i] for i in wanted], grads, allow_unused=True)
        vector_grads = [None] * len(vectors)
        for i, grad in zip(wanted, found):
            vector_grads[i] = torch.zeros_like(leaves[i]) if grad is None else grad
        return (grad_x, None, None, None, None, *vector_grads)
