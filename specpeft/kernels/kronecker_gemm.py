"""`kernels.kronecker_linear`'s torch op on CPU: y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ as 2-D GEMMs and layout copies.

With X_t the row t of x as n1×n2, Y_t = Σ_k A_k X_t B_kᵀ. One algorithm ("B first") runs both contraction orders: it
contracts X_t's last axis with B_k (one GEMM over all tokens), lays the intermediate out with the token axis outside
its other axis (one copy) and contracts that with A_k (a second GEMM), which leaves Y_tᵀ:

    Z = X B_kᵀ  (T·n1, m2),   Z' = Z_t transposed  (T·m2, n1),   Yᵀ += Z' A_kᵀ  (T·m2, m1).

"A first" is the same algorithm on the transposed problem Y_tᵀ = Σ_k B_k X_tᵀ A_kᵀ: X_tᵀ in, Y_t out. Each order
therefore lays out one extra T-sized tensor (the output Y_t for B first, the input X_tᵀ for A first), in forward
and again in backward, where with G_tᵀ (T·m2, m1) as the rows of the run problem:

    dA_k = G'ᵀ Z'  (m1, n1),   W = G' A_k  (T·m2, n1),   W' = W_t transposed  (T·n1, m2),
    dX += W' B_k  (T·n1, n2),  dB_k = W'ᵀ X  (m2, n2).

Six GEMMs and four T-sized copies a step at R = 1, 43 aten ops with views and autograd's own (counted by a
TorchDispatchMode), where the einsum reference runs 77 for the same copies: small token counts are op-bound on CPU.
The CUDA op's token-batched small GEMMs (`kronecker_torch.kronecker_linear_bmm`) ran up to 2× slower on MKL.
Against the einsums, a step of MiniLM's layers took 0.74-0.84× at T = 4-16, 0.75-0.9× at 64 and up to 1.12× at 256
for 1536×384 (A first, whose per-token transposes gather single elements; TeRA runs it factored below 512 tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..init.tucker_cost import kronecker_a_first
from ._dispatch import as_dtype, autocast_dtype, autocast_off
from .kronecker_torch import _pad, _stack

__all__ = ["KroneckerGemmFunction", "kronecker_linear_gemm"]


def _swap_last(t: Tensor, rows: int, cols: int) -> Tensor:
    """(T, rows, cols) → (T, cols, rows) contiguous: every token's matrix transposed (one copy)."""
    return t.view(-1, rows, cols).transpose(1, 2).contiguous()


class KroneckerGemmFunction(torch.autograd.Function):
    """y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ for x (T, d_in ≤ n1·n2) by 2-D GEMMs (module docstring), in x's dtype
    (base_out (T, d_out) or None must be in it). Saves x laid out for the run problem when a factor needs a gradient
    and Z' per component when A does. Once differentiable, like the other Kronecker ops."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, base_out: Optional[Tensor],  # type: ignore[override]
                d_out: int) -> Tensor:
        T, d_in = x.shape
        R, m1, n1 = A.shape
        _, m2, n2 = B.shape
        a, b = as_dtype(A, x.dtype), as_dtype(B, x.dtype)
        transposed = kronecker_a_first(m1, n1, m2, n2)
        X = _pad(x, n1 * n2)  # (T, n1·n2), zero columns meet the padded factor columns
        if transposed:  # the run problem: X_tᵀ (T, n2, n1) with factors (B, A)
            X, (a, b), (m1, n1, m2, n2) = _swap_last(X, n1, n2), (b, a), (m2, n2, m1, n1)
        X = X.reshape(T * n1, n2)  # (T, n1·n2) -> (T·n1, n2)
        full = base_out is not None and d_out == m1 * m2 and R > 0  # base_out joins the op that writes y's layout
        acc = base_out.reshape(T * m2, m1) if full and transposed else None  # A first: the run problem's Yᵀ is y
        saved = []
        for k in range(R):
            # Z = X B_kᵀ: (T·n1, n2) @ (n2, m2) -> (T·n1, m2); Z' = Z_t transposed: (T·m2, n1)
            saved.append(_swap_last(X @ b[k].T, n1, m2).view(T * m2, n1))
            # Yᵀ += Z' A_kᵀ: (T·m2, n1) @ (n1, m1) -> (T·m2, m1)
            if acc is None:
                acc = saved[-1] @ a[k].T
            elif k == 0:  # onto base_out, out of place
                acc = torch.addmm(acc, saved[-1], a[k].T)
            else:
                acc.addmm_(saved[-1], a[k].T)
        if acc is None:  # R = 0
            acc = x.new_zeros(T * m2, m1)
        if transposed:  # A first: the run problem's Yᵀ rows are y's rows
            y = acc.view(T, m1 * m2)
        else:  # B first: (T, m2, m1) -> (T, m1, m2), base_out added by the same op when it covers y
            swapped = acc.view(T, m2, m1).transpose(1, 2)
            y = (base_out.reshape(T, m1, m2) + swapped if full else swapped.contiguous()).view(T, m1 * m2)
        if not full:
            y = y[:, :d_out] if base_out is None else base_out + y[:, :d_out]
        need_a, need_b = ctx.needs_input_grad[1:3]
        ctx.transposed, ctx.d_in, ctx.dtypes = transposed, d_in, (A.dtype, B.dtype)
        keep_z = need_b if transposed else need_a  # Z' feeds the run problem's dA
        ctx.save_for_backward(X if need_a or need_b else None, a, b, *(saved if keep_z else [None] * R))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        X, a, b, *saved = ctx.saved_tensors
        need_x, need_a, need_b, need_base, _ = ctx.needs_input_grad
        R, m1, n1 = a.shape  # the run problem's sizes
        _, m2, n2 = b.shape
        T, transposed = grad_y.shape[0], ctx.transposed
        need_run_a, need_run_b = (need_b, need_a) if transposed else (need_a, need_b)
        G = _pad(grad_y, m1 * m2)  # (T, d_out) -> (T, m1·m2) in y's layout
        # G' = the run problem's G_tᵀ rows (T·m2, m1): y's layout for A first, one copy for B first
        G = G.reshape(T * m2, m1) if transposed else _swap_last(G, m1, m2).view(T * m2, m1)
        grad_x: Optional[Tensor] = None
        grad_a, grad_b = [], []
        for k in range(R):
            if need_run_a:  # dA_k = G'ᵀ Z': (m1, T·m2) @ (T·m2, n1)
                grad_a.append(G.T @ saved[k])
            if need_x or need_run_b:  # W' = (G' A_k)_t transposed: (T·m2, n1) -> (T·n1, m2)
                W = _swap_last(G @ a[k], m2, n1).view(T * n1, m2)
                if need_x:  # dX += W' B_k: (T·n1, m2) @ (m2, n2)
                    grad_x = W @ b[k] if grad_x is None else grad_x.addmm_(W, b[k])
                if need_run_b:  # dB_k = W'ᵀ X: (m2, T·n1) @ (T·n1, n2)
                    grad_b.append(W.T @ X)
        if need_x:
            if grad_x is None:  # R = 0
                grad_x = grad_y.new_zeros(T * n1, n2)
            # the run problem's dX_t (T·n1, n2) -> x's layout (A first: X_tᵀ back, one copy)
            grad_x = (_swap_last(grad_x, n1, n2) if transposed else grad_x).view(T, n1 * n2)[:, :ctx.d_in]
        run_a = _stack(grad_a) if grad_a else torch.zeros_like(a) if need_run_a else None  # R × (m1, n1) -> (R, ...)
        run_b = _stack(grad_b) if grad_b else torch.zeros_like(b) if need_run_b else None
        grad_A, grad_B = (run_b, run_a) if transposed else (run_a, run_b)
        return (grad_x, as_dtype(grad_A, ctx.dtypes[0]), as_dtype(grad_B, ctx.dtypes[1]),
                grad_y if need_base else None, None)


def kronecker_linear_gemm(x: Tensor, A: Tensor, B: Tensor, base_out: Optional[Tensor] = None,
                          out_features: Optional[int] = None) -> Tensor:
    """`kernels.kronecker_linear`'s torch op on CPU (`KroneckerGemmFunction`; shapes as that op validates): x (...,
    d_in ≤ n1·n2), A (R, m1, n1), B (R, m2, n2), base_out (..., d_out) or None → (..., d_out), d_out = out_features
    or m1·m2. Runs in x's dtype or autocast's, base_out cast to it."""
    d_in, d_out = x.shape[-1], out_features or A.shape[1] * B.shape[1]
    dtype = autocast_dtype(x)
    with autocast_off(x.device.type):
        rows = as_dtype(x, dtype).reshape(-1, d_in)  # (..., d_in) -> (T, d_in)
        base_rows = None if base_out is None else as_dtype(base_out, dtype).reshape(-1, d_out)
        y = KroneckerGemmFunction.apply(rows, A, B, base_rows, d_out)
    return y.reshape(*x.shape[:-1], d_out)  # (T, d_out) -> (..., d_out)
