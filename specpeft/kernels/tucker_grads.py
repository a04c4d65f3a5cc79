"""Torch contractions behind TeRA's hand-written merged-path backward (specpeft/adapters/tera_function.py): the
gradients of the scaled network's outer block P and one factor from dY and X, either through a dense dΔ = dYᵀX
("dense") or projected mode by mode through the frozen factors without forming dΔ ("projected")."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import matmul_fp32_out
from ..init.tucker import TuckerShape, unmerged_indices

__all__ = ["tucker_vector_grads_dense", "tucker_vector_grads_projected"]


def tucker_vector_grads_dense(g2: Tensor, x2: Tensor, outer: Tensor, last: Tensor, shape: TuckerShape,
                              workspace: Optional[Tensor] = None, small: bool = False) -> tuple[Tensor, Tensor]:
    """(dP, dŨ_N) from dΔ = dYᵀX formed with rows (a_N, a') (the layout of `last_mode_delta_rows`); dΔ is
    written into `workspace` (a free contiguous m×n buffer) when its dtype fits. TeRA's "dense" vector gradients
    (specpeft/adapters/tera.py): outer = P (m'·n', R_N) of `last_mode_outer`, last = Ũ_N (J_N, R_N).

    dP = Σ_{a_N, b_N} dΔ[(a', a_N), (b', b_N)] Ũ_N[(a_N, b_N), :],   dŨ_N = Σ_{a', b'} dΔ[…] P[(a', b'), :].
    `small`: fold dΔ with one copy and contract with two GEMMs; else a loop over a_N on strided blocks (no m·n
    copy, dΔ's rows produced in the (a_N, a') order by permuting the smaller of dY and dΔ).
    """
    tokens, m_last, n_last = g2.shape[0], shape.out_modes[-1], shape.in_modes[-1]
    m, n = shape.out_features, shape.in_features
    if small:  # fold dΔ with one copy, then two GEMMs (fewer ops than the loop below)
        d_full = g2.T @ x2 if g2.dtype == x2.dtype == torch.float64 else matmul_fp32_out(g2.T, x2)  # (m, n)
        # (m', m_N, n', n_N) -> (m', n', m_N, n_N) -> (m'·n', J_N)
        folded = d_full.to(outer.dtype).view(m // m_last, m_last, n // n_last, n_last).transpose(1, 2)
        folded = folded.reshape(outer.shape[0], m_last * n_last)
        return folded @ last, folded.T @ outer  # (m'n', J_N)·(J_N, R_N) and (J_N, m'n')·(m'n', R_N)
    permute_grad = tokens <= n  # reorder the smaller of dY (T·m) and dΔ (m·n) into the (a_N, a') row order
    if permute_grad:  # (T, m', m_N) -> (T, m_N, m') -> (T, m): dY's columns in the (a_N, a') order
        g2 = g2.reshape(tokens, m // m_last, m_last).transpose(1, 2).reshape(tokens, m)
    if workspace is not None and permute_grad and workspace.dtype == g2.dtype == x2.dtype == outer.dtype:
        d_rows = torch.mm(g2.T, x2, out=workspace.view(m, n))  # (m, T)·(T, n) -> (m, n)
    elif g2.dtype == x2.dtype == torch.float64:  # contracted in the vectors' dtype below, as in the small branch
        d_rows = (g2.T @ x2).to(outer.dtype)  # (m, T)·(T, n) -> (m, n)
    else:  # 16-bit activations: an fp32 dΔ (it is reduced further; bf16 rounding would cost ~1 % relative)
        d_rows = matmul_fp32_out(g2.T, x2).to(outer.dtype)
    if not permute_grad:  # rows (a', a_N) -> (a_N, a'): a gather of contiguous rows of n
        d_rows = d_rows.view(m // m_last, m_last, n).transpose(0, 1).contiguous()
    d_rows = d_rows.view(m_last, outer.shape[0], n_last)  # (m_N·m', n'·n_N) -> (m_N, m'·n', n_N)
    cube = last.reshape(m_last, n_last, -1)  # (J_N, R_N) -> (m_N, n_N, R_N)
    grad_outer = torch.zeros_like(outer)
    grad_cube = torch.empty_like(cube)
    for a_last in range(m_last):
        block = d_rows[a_last]  # (m'·n', n_N), contiguous
        grad_outer.addmm_(block, cube[a_last])  # Σ_{b_N}: (m'n', n_N)·(n_N, R_N)
        torch.mm(block.T, outer, out=grad_cube[a_last])  # Σ_{(a', b')}: (n_N, m'n')·(m'n', R_N)
    return grad_outer, grad_cube.view_as(last)


def tucker_vector_grads_projected(g2: Tensor, x2: Tensor, merged: Tensor, factor: Tensor, shape: TuckerShape,
                                  k: int) -> tuple[Tensor, Tensor]:
    """(dP_k, dŨ_k) contracting dY and X through the frozen network mode by mode, never forming dΔ.

    merged = P_k = 𝒢 ×_{l≠k} Ũ_l in `init.tucker.unmerged_core`'s layout, factor = Ũ_k. With Z = X ×_{b_k} Ũ_k:
    dP_k = Σ_{t, a_k} dY ⊗ Z, dZ = dY ×_{a_{≠k}} P_k, dŨ_k = Σ_{t, b_{≠k}} X ⊗ dZ
    (2·T·(n·m_k·R_k + (n/n_k)·R_k·m) MACs).
    """
    tokens = g2.shape[0]
    idx = unmerged_indices(shape.order, k)
    cube = factor.reshape(shape.out_modes[k], shape.in_modes[k], shape.ranks[k]).to(g2.dtype)  # (m_k, n_k, R_k)
    xs = x2.reshape(tokens, *shape.in_modes).to(g2.dtype)  # (T, n) -> (T, n_1..n_N)
    gs = g2.reshape(tokens, *shape.out_modes)  # (T, m) -> (T, m_1..m_N)
    pairs = merged.to(g2.dtype)
    z = torch.einsum(f"t{idx.b},{idx.cube}->{idx.z}", xs, cube)  # (T, n_{≠k}, m_k, R_k)
    grad_merged = torch.einsum(f"t{idx.a},{idx.z}->{idx.p}", gs, z)  # Σ_{t, a_k} -> P_k's layout
    del z
    grad_z = torch.einsum(f"t{idx.a},{idx.p}->{idx.z}", gs, pairs)  # Σ_{a_{≠k}} -> (T, n_{≠k}, m_k, R_k)
    grad_cube = torch.einsum(f"t{idx.b},{idx.z}->{idx.cube}", xs, grad_z)  # Σ_{t, b_{≠k}}
    return grad_merged.to(merged.dtype), grad_cube.reshape(factor.shape).to(factor.dtype)
