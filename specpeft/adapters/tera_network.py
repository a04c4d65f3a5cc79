"""TeRA's scaled Tucker network split at its last mode, Δ = Σ_r A_r ⊗ B_r, as one autograd node.

    Ũ_k = diag(λ_k) U_k diag(μ_k),   C = 𝒢 ×_1 Ũ_1 … ×_{N−1} Ũ_{N−1},
    A_r = unfold'(C[…, r]) (m', n'),   B_r = α·reshape(Ũ_N[:, r], (m_N, n_N)),

the factors `kernels.kronecker_merged_linear` and `kernels.kronecker_linear` consume (`kernels.tucker.kronecker_factors`
computes the same from already-scaled factors). The mode products run as a chain of mm on transposed views,
C_k = M_k Ũ_kᵀ with M_k = C_{k−1} reshaped (R_k, rest)ᵀ, and the backward applies the chain rule by hand:

    dŨ_k = dC_kᵀ M_k,   dM_k = dC_k Ũ_k,   dλ_k = (dŨ_k ⊙ U_k) μ_k,   dμ_k = (dŨ_k ⊙ U_k)ᵀ λ_k.

Why a hand-written node: every tensor here is tiny, so its cost is the number of ops. Autograd through the same
chain ran 26 forward and 49 backward aten ops at 384² (broadcast muls, their reductions, permutes); this node runs 20
and 29 (torch.profiler). On CUDA that is host time the GPU waits for (benchmarks/results/tera_gpu.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..init.tucker import TuckerShape, last_as_kronecker, outer_as_kronecker, outer_chain
from ..kernels._dispatch import as_dtype, autocast_off


def scaled_factor(factor: Tensor, lam: Optional[Tensor], mu: Optional[Tensor]) -> Tensor:
    """Ũ = diag(λ) U diag(μ) (either side may be absent), all in one dtype; one broadcast op per side at most."""
    if lam is not None and mu is not None:
        return factor * torch.outer(lam, mu)  # (J_k, R_k) ⊙ λ_k μ_kᵀ
    if lam is not None:
        return lam[:, None] * factor  # (J_k, 1) ⊙ (J_k, R_k)
    return factor if mu is None else factor * mu  # (J_k, R_k) ⊙ (R_k,)


class KroneckerNetworkFunction(torch.autograd.Function):
    """(A, B) from the frozen core and factors and the trainable diagonals; gradients flow to the diagonals only.

    Inputs after (shape, alpha, n_lams, n_mus): the core (R_1..R_N), the N factors U_k (J_k, R_k), then λ_1..λ_N
    (`n_lams` = N or 0) and μ_1..μ_N (`n_mus` = N or 0), all in the diagonals' dtype (the frozen tensors are cast).
    """

    @staticmethod
    def forward(ctx, shape: TuckerShape, alpha: float, n_lams: int, n_mus: int,  # type: ignore[override]
                core: Tensor, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        order = shape.order
        dtype = tensors[order].dtype  # the first diagonal's: fp32 trainables (fp64 after model.double())
        factors = [as_dtype(f, dtype) for f in tensors[:order]]
        lams = list(tensors[order:order + n_lams]) or [None] * order
        mus = list(tensors[order + n_lams:]) or [None] * order
        scaled = [scaled_factor(factor, lam, mu) for factor, lam, mu in zip(factors, lams, mus)]
        chain, inputs = outer_chain(as_dtype(core, dtype), scaled)  # (R_N, J'), M_k
        A = outer_as_kronecker(chain, shape.out_modes, shape.in_modes)  # (R, m', n')
        B = last_as_kronecker(scaled[-1] * alpha if alpha != 1.0 else scaled[-1], shape.out_modes, shape.in_modes)
        ctx.shape, ctx.alpha, ctx.n_lams, ctx.n_mus = shape, alpha, n_lams, n_mus
        ctx.save_for_backward(*factors, *scaled, *inputs, *tensors[order:])
        return A, B

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a: Optional[Tensor], grad_b: Optional[Tensor]):  # type: ignore[override]
        device = (grad_a if grad_a is not None else grad_b).device.type  # saved tensors unpack once (checkpointing)
        with autocast_off(device):  # a backward called inside autocast keeps the forward's dtype
            return KroneckerNetworkFunction._backward(ctx, grad_a, grad_b)

    @staticmethod
    def _backward(ctx, grad_a: Optional[Tensor], grad_b: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        shape: TuckerShape = ctx.shape
        order, rank = shape.order, shape.ranks[-1]
        saved = ctx.saved_tensors
        factors, scaled = saved[:order], saved[order:2 * order]
        inputs, vectors = saved[2 * order:3 * order - 1], saved[3 * order - 1:]
        lams = list(vectors[:ctx.n_lams]) or [None] * order
        mus = list(vectors[ctx.n_lams:]) or [None] * order
        grads: list[Optional[Tensor]] = [None] * order  # dŨ_k
        if grad_a is not None and order > 1:
            split = [rank, *shape.out_modes[:-1], *shape.in_modes[:-1]]
            inverse = [0] + [a for k in range(order - 1) for a in (1 + k, order + k)]  # undo the unfold's permute
            d_chain = grad_a.reshape(split).permute(inverse).reshape(-1, shape.mode_sizes[order - 2])  # (…, J_{N−1})
            for k in reversed(range(order - 1)):
                grads[k] = d_chain.T @ inputs[k]  # (J_k, rest) @ (rest, R_k) -> (J_k, R_k)
                if k:  # dM_k = dC_k Ũ_k, then back to C_{k−1}'s (rest', J_{k−1}) layout
                    d_input = d_chain @ scaled[k]  # (rest, J_k) @ (J_k, R_k) -> (rest, R_k)
                    d_chain = d_input.T.reshape(-1, shape.mode_sizes[k - 1])  # (R_k, rest) -> (rest', J_{k−1})
        if grad_b is not None:
            grads[-1] = grad_b.reshape(rank, -1).T  # (R, m_N, n_N) -> (J_N, R)
            if ctx.alpha != 1.0:
                grads[-1] = grads[-1] * ctx.alpha
        lam_grads: list[Optional[Tensor]] = []
        mu_grads: list[Optional[Tensor]] = []
        for grad, factor, lam, mu in zip(grads, factors, lams, mus):
            weighted = None if grad is None else grad * factor  # dŨ_k ⊙ U_k: (J_k, R_k)
            if lam is not None:
                lam_grads.append(None if weighted is None else weighted @ mu if mu is not None else weighted.sum(1))
            if mu is not None:
                mu_grads.append(None if weighted is None else lam @ weighted if lam is not None else weighted.sum(0))
        return (None, None, None, None, None, *([None] * order), *_zeros_for_none(lam_grads + mu_grads, vectors))


def _zeros_for_none(grads: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> list[Tensor]:
    """A diagonal no gradient reached (an unused output) gets zeros, as autograd would report."""
    return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, like)]


def kronecker_network(shape: TuckerShape, core: Tensor, factors: Sequence[Tensor], lams: Sequence[Tensor],
                      mus: Sequence[Tensor], alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """(A (R_N, m', n'), B (R_N, m_N, n_N)) of α·Δ for diagonals `lams` (N or none) and `mus` (N or none), in their
    dtype; differentiable in the diagonals (`KroneckerNetworkFunction`)."""
    with autocast_off(core.device.type):  # the diagonals' dtype throughout, as the backward runs
        return KroneckerNetworkFunction.apply(shape, alpha, len(lams), len(mus), core, *factors, *lams, *mus)
