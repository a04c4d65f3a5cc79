"""SoKA's factored product y = base + x ΔWᵀ over the 2r stacked Kronecker components, with a hand-written backward.

Split from soka.py (the adapter) because it is the one piece with its own math and tuning: the contraction order
(`b_first`), token chunking, and which gradients are needed (only those of Σ_k A_k⊗B_k).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels.kronecker_torch import accumulate_mm, token_chunks


def b_first(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> bool:
    """Whether contracting B first costs fewer fwd+bwd MACs per token and component than A first.

    B first (`KroneckerDeltaFunction`): 6·n1·n2·m2 + 5·m1·n1·m2 per r (forward 2 stages × 2r components; backward
    dZ and dX × 2r, dA's recomputed Z₁ and contraction and dB's contraction × r); A first is the mirror image.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    return 6 * n1 * n2 * m2 + 5 * m1 * n1 * m2 <= 6 * m1 * n1 * n2 + 5 * m1 * m2 * n2


class KroneckerDeltaFunction(torch.autograd.Function):
    """y = base + x ΔWᵀ with ΔW = Σ_k (U_k − U⁰_k)⊗V_k + U⁰_k⊗(V_k − V⁰_k), in token chunks, never forming ΔW.

    Row t of x viewed as X_t (q1×q2) gives Y_t = Σ_c P_c X_t Q_cᵀ over the 2r stacked pairs P = [U − U⁰; U⁰]
    (p1×q1), Q = [V; V − V⁰] (p2×q2). Per chunk: Z = X Qᵀ (one GEMM (c·q1, q2) @ (q2, 2r·p2)), Y = P Z (one batched
    GEMM, K = 2r·q1). Since ΔW = Σ_k U_k⊗V_k − U⁰_k⊗V⁰_k, the trainable gradients are those of Σ_k U_k⊗V_k:

        dX_t = Σ_c P_cᵀ G_t Q_c,   dU_k = Σ_t G_t (X_t V_kᵀ)ᵀ,   dV_k = Σ_t (U_kᵀ G_t)ᵀ X_t,

    with D = Pᵀ G shared by dX and dV (its two halves sum to Uᵀ G) and X Vᵀ recomputed per chunk, so only x is
    saved. The autograd form would also differentiate the frozen half and save every intermediate.
    `transposed`: rows hold X_tᵀ and Y_tᵀ (the A-first order, run as B-first on the transposed problem).
    """

    @staticmethod
    def forward(ctx, x: Tensor, U: Tensor, V: Tensor, U0: Tensor, V0: Tensor,  # type: ignore[override]
                base: Optional[Tensor], transposed: bool) -> Tensor:
        P = torch.cat([U - U0, U0]).to(x.dtype)  # 2 × (r, p1, q1) -> (2r, p1, q1)
        Q = torch.cat([V, V - V0]).to(x.dtype)  # 2 × (r, p2, q2) -> (2r, p2, q2)
        R, p1, q1 = P.shape
        _, p2, q2 = Q.shape
        q_rows = Q.reshape(R * p2, q2)  # (2r, p2, q2) -> (2r·p2, q2), rows (c, j)
        p_cols = P.permute(1, 2, 0).reshape(p1, q1 * R)  # (2r, p1, q1) -> (p1, q1·2r), columns (l, c)
        y = torch.empty(x.shape[0], p1 * p2, device=x.device, dtype=x.dtype)
        for start, stop in token_chunks(x.shape[0], q1 * R * p2, x.device):
            n = stop - start
            z = _rows_in(x[start:stop], q1, q2, transposed) @ q_rows.T  # (n·q1, q2) @ (q2, 2r·p2) -> (n·q1, 2r·p2)
            p_batch = p_cols.expand(n, p1, q1 * R)  # stride-0 batch of the shared factor
            z = z.view(n, q1 * R, p2)  # (n·q1, 2r·p2) -> (n, q1·2r, p2): rows (l, c) meet P's columns
            base_rows = None if base is None else base[start:stop]
            if transposed:  # Y_tᵀ: transpose back while adding the base
                y_t = torch.bmm(p_batch, z)  # (n, p1, q1·2r) @ (n, q1·2r, p2) -> (n, p1, p2) = (n, m2, m1)
                out = y[start:stop].view(n, p2, p1)  # (n, m1·m2) -> (n, m1, m2)
                out.copy_(y_t.mT) if base is None else torch.add(base_rows.view(n, p2, p1), y_t.mT, out=out)
            elif base is None:
                torch.bmm(p_batch, z, out=y[start:stop].view(n, p1, p2))  # (n, p1, q1·2r) @ (n, q1·2r, p2)
            else:  # base + P Z in the GEMM's epilogue
                torch.baddbmm(base_rows.view(n, p1, p2), p_batch, z, out=y[start:stop].view(n, p1, p2))
        ctx.save_for_backward(x, U, V, U0, V0)
        ctx.transposed = transposed
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, U, V, U0, V0 = ctx.saved_tensors
        need_x, need_u, need_v, _, _, need_base, _ = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        P = torch.cat([U - U0, U0]).to(x.dtype)  # (2r, p1, q1)
        Q = torch.cat([V, V - V0]).to(x.dtype)  # (2r, p2, q2)
        (R, p1, q1), (r, p2, q2) = P.shape, V.shape
        q_rows = Q.reshape(R * p2, q2)  # (2r·p2, q2), rows (c, j)
        p_cols_t = P.permute(1, 2, 0).reshape(p1, q1 * R).mT  # (q1·2r, p1), rows (l, c)
        v_rows = V.to(x.dtype).reshape(r * p2, q2)  # (r, p2, q2) -> (r·p2, q2)
        grad_x = torch.empty_like(x) if need_x else None
        grad_u = torch.zeros(p1, q1 * r, device=x.device, dtype=U.dtype) if need_u else None  # columns (l, k)
        grad_v = torch.zeros(r * p2, q2, device=x.device, dtype=V.dtype) if need_v else None  # rows (k, j)
        for start, stop in token_chunks(x.shape[0], q1 * R * p2, x.device):
            n = stop - start
            g = grad_y[start:stop].view(n, p1 * p2)  # (n, m1·m2)
            g = g.view(n, p2, p1).mT.contiguous() if ctx.transposed else g.view(n, p1, p2)  # G_t: (n, p1, p2)
            rows = _rows_in(x[start:stop], q1, q2, ctx.transposed)  # (n·q1, q2)
            d = torch.bmm(p_cols_t.expand(n, q1 * R, p1), g)  # D = Pᵀ G: (n, q1·2r, p2), rows (l, c)
            if need_x:  # dX = D Q: (n·q1, 2r·p2) @ (2r·p2, q2) -> (n·q1, q2)
                if ctx.transposed:  # rows of D hold dX_tᵀ: transpose back, (n, q1, q2) -> (n, q2, q1)
                    grad_x[start:stop].view(n, q2, q1).copy_((d.view(n * q1, R * p2) @ q_rows).view(n, q1, q2).mT)
                else:
                    torch.mm(d.view(n * q1, R * p2), q_rows, out=grad_x[start:stop].view(n * q1, q2))
            if need_v:
                halves = d.view(n * q1, 2, r * p2)  # (n·q1, 2r·p2) -> (n·q1, 2, r·p2)
                u_t_g = halves[:, 0] + halves[:, 1]  # (U − U⁰)ᵀG + U⁰ᵀG = UᵀG: (n·q1, r·p2)
                accumulate_mm(grad_v, u_t_g.mT, rows)  # (r·p2, n·q1) @ (n·q1, q2)
            if need_u:
                z1 = (rows @ v_rows.T).view(n, q1 * r, p2)  # X_t V_kᵀ: (n·q1, r·p2) -> (n, q1·r, p2)
                grad_u += torch.bmm(g, z1.mT).sum(0, dtype=grad_u.dtype)  # Σ_t G_t Z₁ᵀ: (n, p1, q1·r) -> (p1, q1·r)
        if need_u:
            grad_u = grad_u.view(p1, q1, r).permute(2, 0, 1)  # (p1, q1·r) -> (r, p1, q1)
        if need_v:
            grad_v = grad_v.view(r, p2, q2)  # (r·p2, q2) -> (r, p2, q2)
        return grad_x, grad_u, grad_v, None, None, (grad_y if need_base else None), None


def _rows_in(x: Tensor, q1: int, q2: int, transposed: bool) -> Tensor:
    """Token rows (n, q1·q2) as the stacked matrices X_t: (n·q1, q2); rows hold X_tᵀ when `transposed`."""
    if not transposed:
        return x.reshape(-1, q2)  # (n, q1·q2) -> (n·q1, q2)
    return x.view(-1, q2, q1).mT.reshape(-1, q2)  # (n, q2·q1) -> (n, q1, q2) -> (n·q1, q2), a copy
