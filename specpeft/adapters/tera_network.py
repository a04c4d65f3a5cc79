"""TeRA's scaled Tucker network split at its last mode, Δ = Σ_r A_r ⊗ B_r, for one or many layers as one autograd node.

    Ũ_k = diag(λ_k) U_k diag(μ_k),   C = 𝒢 ×_1 Ũ_1 … ×_{N−1} Ũ_{N−1},
    A_r = unfold'(C[…, r]) (m', n'),   B_r = α·reshape(Ũ_N[:, r], (m_N, n_N)),

the factors `kernels.kronecker_merged_linear` and `kernels.kronecker_linear` consume (`kernels.tucker.kronecker_factors`
computes the same from already-scaled factors). The mode products run as a chain of mm on transposed views,
C_k = M_k Ũ_kᵀ with M_k = C_{k−1} reshaped (R_k, rest)ᵀ, and the backward applies the chain rule by hand:

    dŨ_k = dC_kᵀ M_k,   dM_k = dC_k Ũ_k,   dλ_k = (dŨ_k ⊙ U_k) μ_k,   dμ_k = (dŨ_k ⊙ U_k)ᵀ λ_k.

Why a hand-written node: every tensor here is tiny, so its cost is the number of ops. Autograd through the same
chain ran 26 forward and 49 backward aten ops at 384² (broadcast muls, their reductions, permutes); this node runs 20
and 29 (torch.profiler). On CUDA that is host time the GPU waits for (benchmarks/results/tera_gpu.md). Layers of one
bucket share 𝒢 and U_k, so L of them run as one node whose every product gains a leading L axis (their diagonals
stacked): the ops of one layer for all L (`kronecker_networks`; adapters/tera_pass.py runs it once per forward pass).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..init.tucker import TuckerShape, last_as_kronecker, outer_as_kronecker, outer_chain
from ..init.tucker_cost import last_mode_split
from ..kernels._dispatch import as_dtype, autocast_off


def scaled_factor(factor: Tensor, lam: Optional[Tensor], mu: Optional[Tensor]) -> Tensor:
    """Ũ = diag(λ) U diag(μ) for U (J, R), λ (…, J), μ (…, R) (either side may be absent), all in one dtype → (…, J, R);
    one broadcast op per side at most."""
    if lam is not None and mu is not None:
        return factor * (lam.unsqueeze(-1) * mu.unsqueeze(-2))  # (J, R) ⊙ λ μᵀ
    if lam is not None:
        return lam.unsqueeze(-1) * factor  # (…, J, 1) ⊙ (J, R)
    return factor if mu is None else factor * mu.unsqueeze(-2)  # (J, R) ⊙ (…, 1, R)


def _stacked(parts: Sequence[Tensor]) -> Tensor:
    """L × (size,) → (L, size); one layer keeps no layer axis (the op count of a network of its own)."""
    return parts[0] if len(parts) == 1 else torch.stack(list(parts))


def _stacked_grads(grads: Sequence[Optional[Tensor]], size: Sequence[int]) -> Optional[Tensor]:
    """The per-layer gradients of one output stacked (`_stacked`), zeros for a layer whose output went unused; None
    if all did."""
    if all(g is None for g in grads):
        return None
    like = next(g for g in grads if g is not None)
    return _stacked([like.new_zeros(size) if g is None else g for g in grads])


class KroneckerNetworkFunction(torch.autograd.Function):
    """(A_l, B_l) of L layers from the frozen core and factors and each layer's trainable diagonals; gradients flow to
    the diagonals only.

    Inputs after (shape, alpha, n_layers, n_lams, n_mus): the core (R_1..R_N), the N factors U_k (J_k, R_k), then each
    layer's λ_1..λ_N (`n_lams` = N or 0) and μ_1..μ_N (`n_mus` = N or 0) in turn, all in the diagonals' dtype (the frozen
    tensors are cast). Outputs A_1..A_L, then B_1..B_L. A layer whose outputs receive no gradient gets None for its
    diagonals, as it would from a node of its own.

    The intermediates stay on the node rather than in `save_for_backward` (outside torch.compile): activation
    checkpointing then never sees them, so a layer may get its factors from a pass's node in forward and from a node
    of its own when recomputed in backward (adapters/tera_pass.py) and still save the same tensors. The backward checks
    the versions of what they alias instead (the shared core and factors; a single layer's diagonals, which L layers
    stack into copies), as autograd checks saved tensors.
    """

    @staticmethod
    def forward(ctx, shape: TuckerShape, alpha: float, n_layers: int, n_lams: int,  # type: ignore[override]
                n_mus: int, core: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        order, per_layer = shape.order, n_lams + n_mus
        vectors = tensors[order:]
        dtype = vectors[0].dtype  # the first diagonal's: fp32 trainables (fp64 after model.double())
        factors = [as_dtype(f, dtype) for f in tensors[:order]]
        stacked = [_stacked(vectors[i::per_layer]) for i in range(per_layer)]  # (…, J_k) or (…, R_k): (L,) or ()
        lams = stacked[:n_lams] or [None] * order
        mus = stacked[n_lams:] or [None] * order
        scaled = [scaled_factor(factor, lam, mu) for factor, lam, mu in zip(factors, lams, mus)]  # (…, J_k, R_k)
        chain, inputs = outer_chain(as_dtype(core, dtype), scaled)  # (…, R_N, J'), M_k
        A = outer_as_kronecker(chain, shape.out_modes, shape.in_modes)  # (…, R, m', n')
        B = last_as_kronecker(scaled[-1] * alpha if alpha != 1.0 else scaled[-1], shape.out_modes, shape.in_modes)
        ctx.shape, ctx.alpha, ctx.n_layers, ctx.n_lams, ctx.per_layer = shape, alpha, n_layers, n_lams, per_layer
        kept = (*factors, *scaled, *inputs, *stacked)
        ctx.traced = torch.compiler.is_compiling()
        if ctx.traced:  # a traced graph saves as usual
            ctx.save_for_backward(*kept)
        else:  # tiny tensors, freed with the node; checked: what they alias (the bucket, one layer's diagonals)
            checked = (core, *tensors[:order], *(vectors if n_layers == 1 else ()))
            ctx.kept, ctx.checked, ctx.versions = kept, checked, [tensor._version for tensor in checked]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return (*A.unbind(0), *B.unbind(0)) if n_layers > 1 else (A, B)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[Tensor]):  # type: ignore[override]
        shape: TuckerShape = ctx.shape
        n_layers, order = ctx.n_layers, shape.order
        rank = shape.ranks[-1]
        grad_a = _stacked_grads(grads[:n_layers], (rank, *last_mode_split(shape.out_modes, shape.in_modes)[:2]))
        grad_b = _stacked_grads(grads[n_layers:], (rank, shape.out_modes[-1], shape.in_modes[-1]))
        frozen = (None,) * (6 + order)  # shape, alpha, n_layers, n_lams, n_mus, core, factors
        if grad_a is None and grad_b is None:
            return (*frozen, *([None] * ctx.per_layer * n_layers))
        device = (grad_a if grad_a is not None else grad_b).device.type
        with autocast_off(device):  # a backward called inside autocast keeps the forward's dtype
            stacked = KroneckerNetworkFunction._backward(ctx, grad_a, grad_b)
        columns = [g.unbind(0) for g in stacked] if n_layers > 1 else [(g,) for g in stacked]
        used = [grads[l] is not None or grads[n_layers + l] is not None for l in range(n_layers)]
        return (*frozen, *(column[l] if used[l] else None for l in range(n_layers) for column in columns))

    @staticmethod
    def _backward(ctx, grad_a: Optional[Tensor], grad_b: Optional[Tensor]) -> list[Tensor]:
        """The stacked gradients (L, ·) of each diagonal (no layer axis for one layer), in the inputs' per-layer order."""
        shape: TuckerShape = ctx.shape
        order, rank = shape.order, shape.ranks[-1]
        lead = [ctx.n_layers] if ctx.n_layers > 1 else []
        if not ctx.traced and any(t._version != version for t, version in zip(ctx.checked, ctx.versions)):
            raise RuntimeError("TeRA network: a tensor its backward reads (a layer's mode_scale_k / rank_scale_k, or the "
                               "shared core and factors) was modified in place after the forward; step the optimizer "
                               "after backward.")
        saved = ctx.saved_tensors if ctx.traced else ctx.kept
        factors, scaled = saved[:order], saved[order:2 * order]
        inputs, vectors = saved[2 * order:3 * order - 1], saved[3 * order - 1:]
        lams = list(vectors[:ctx.n_lams]) or [None] * order
        mus = list(vectors[ctx.n_lams:]) or [None] * order
        grads: list[Optional[Tensor]] = [None] * order  # dŨ_k, (…, J_k, R_k)
        if grad_a is not None and order > 1:
            split = [*lead, rank, *shape.out_modes[:-1], *shape.in_modes[:-1]]
            first = len(lead) + 1  # the axis of m_1
            inverse = [*range(first)] + [a for k in range(order - 1) for a in (first + k, first + order - 1 + k)]
            d_chain = grad_a.reshape(split).permute(inverse).reshape(*lead, -1, shape.mode_sizes[order - 2])
            for k in reversed(range(order - 1)):
                grads[k] = d_chain.mT @ inputs[k]  # (…, J_k, rest) @ (…, rest, R_k) -> (…, J_k, R_k)
                if k:  # dM_k = dC_k Ũ_k, then back to C_{k−1}'s (rest', J_{k−1}) layout
                    d_input = d_chain @ scaled[k]  # (…, rest, J_k) @ (…, J_k, R_k) -> (…, rest, R_k)
                    d_chain = d_input.mT.reshape(*lead, -1, shape.mode_sizes[k - 1])  # -> (…, rest', J_{k−1})
        if grad_b is not None:
            grads[-1] = grad_b.reshape(*lead, rank, -1).mT  # (…, R, m_N, n_N) -> (…, J_N, R)
            if ctx.alpha != 1.0:
                grads[-1] = grads[-1] * ctx.alpha
        lam_grads: list[Tensor] = []
        mu_grads: list[Tensor] = []
        for grad, factor, lam, mu in zip(grads, factors, lams, mus):
            weighted = None if grad is None else grad * factor  # dŨ_k ⊙ U_k: (…, J_k, R_k)
            if lam is not None:  # Σ_r weighted μ: (…, J_k, R_k) @ (…, R_k, 1)
                lam_grads.append(torch.zeros_like(lam) if weighted is None else weighted.sum(-1) if mu is None else
                                 (weighted @ mu.unsqueeze(-1)).squeeze(-1))
            if mu is not None:  # Σ_j λ weighted: (…, 1, J_k) @ (…, J_k, R_k)
                mu_grads.append(torch.zeros_like(mu) if weighted is None else weighted.sum(-2) if lam is None else
                                (lam.unsqueeze(-2) @ weighted).squeeze(-2))
        return lam_grads + mu_grads


def kronecker_networks(shape: TuckerShape, core: Tensor, factors: Sequence[Tensor],
                       layers: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]], alpha: float = 1.0,
                       ) -> list[tuple[Tensor, Tensor]]:
    """(A (R_N, m', n'), B (R_N, m_N, n_N)) of α·Δ for each layer's (λ's (N or none), μ's (N or none)), in the
    diagonals' dtype; one differentiable node for all (`KroneckerNetworkFunction`)."""
    flat = [vector for lams, mus in layers for vector in (*lams, *mus)]
    n_layers = len(layers)
    with autocast_off(core.device.type):  # the diagonals' dtype throughout, as the backward runs
        out = KroneckerNetworkFunction.apply(shape, alpha, n_layers, len(layers[0][0]), len(layers[0][1]), core,
                                             *factors, *flat)
    return list(zip(out[:n_layers], out[n_layers:]))


def kronecker_network(shape: TuckerShape, core: Tensor, factors: Sequence[Tensor], lams: Sequence[Tensor],
                      mus: Sequence[Tensor], alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """`kronecker_networks` of one layer."""
    return kronecker_networks(shape, core, factors, [(lams, mus)], alpha)[0]
