"""`kernels.kronecker_linear`'s torch op on CPU: y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ as 2-D GEMMs and layout copies.

With X_t the row t of x as n1×n2, Y_t = Σ_k A_k X_t B_kᵀ. One algorithm ("B first") runs both contraction orders: it
contracts X_t's last axis with B_k (one GEMM over all tokens), lays the intermediate out with the token axis inside
its other axis (one copy of whole rows) and contracts that with A_k (a second GEMM), which leaves Y_tᵀ:

    Z = X B_kᵀ  (T·n1, m2),   Zₘ = Z as (n1, T·m2), row p = (Z_t[p, :])_t,   Yᵀ += Zₘᵀ A_kᵀ  (T·m2, m1).

"A first" is the same algorithm on the transposed problem Y_tᵀ = Σ_k B_k X_tᵀ A_kᵀ: X_tᵀ in, Y_t out. Each order
therefore lays out one extra T-sized tensor (the output Y_t for B first, the input X_tᵀ for A first), in forward
and again in backward, where with G_tᵀ (T·m2, m1) as the rows G' of the run problem:

    dA_kᵀ = Zₘ G'  (n1, m1),   Wₘ = A_kᵀ G'ᵀ  (n1, T·m2),   W' = Wₘ with the tokens outside  (T·n1, m2),
    dX += W' B_k  (T·n1, n2),  dB_k = W'ᵀ X  (m2, n2).

These layouts keep n1 off the narrow side of the GEMMs that read Zₘ and Wₘ: MKL ran the reduction G'ᵀ Z' into a
(m1, n1) = (24, 6) output 4-5× slower than Zₘ G', and G' A_k with 6 output columns 1.2-3× slower than A_kᵀ G'ᵀ (A first
at 1536×384 has n1 = 6; m2 = 6 at 384×1536, B first, still leaves Z = X B_kᵀ six columns wide). Transposing Z_t and
W_t per token instead (the previous layout) took that layer's step 1.1-1.6× longer at T = 16-256 and was within noise
at 384² and 384×1536 (in-process A/B). Against the einsum reference the previous layout took a step of MiniLM's layers
0.74-0.84× at T = 4-16 and 0.75-0.9× at 64.

Six GEMMs and four T-sized copies a step at R = 1: 45 aten ops with views, the base_out add and autograd's own
(counted by a TorchDispatchMode around forward and a `.backward()` into existing gradients; 52 while x and y were
reshaped outside the node, each reshape an autograd node of its own), where the einsum reference runs 78: small token
counts are op-bound on CPU.
The CUDA op's token-batched small GEMMs (`kronecker_torch.kronecker_linear_bmm`) ran up to 2× slower on MKL.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..init.tucker_cost import kronecker_a_first
from ._dispatch import as_dtype
from .kronecker_torch import (apply_kronecker_op, input_grad, op_output, pad_columns, save_for_factor_grads,
                              stack_components)

__all__ = ["KroneckerGemmFunction", "kronecker_linear_gemm"]


def _swap_last(t: Tensor, rows: int, cols: int) -> Tensor:
    """(T, rows, cols) → (T, cols, rows) contiguous: every token's matrix transposed (one copy)."""
    return t.reshape(-1, rows, cols).transpose(1, 2).contiguous()


def _swap_outer(t: Tensor, outer: int, inner: int, cols: int) -> Tensor:
    """(outer, inner, cols) → (inner, outer, cols) contiguous: the first two axes swapped, rows of `cols` moved whole
    (one copy)."""
    return t.reshape(outer, inner, cols).transpose(0, 1).contiguous()


class KroneckerGemmFunction(torch.autograd.Function):
    """y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ for x (..., d_in ≤ n1·n2) by 2-D GEMMs (module docstring), in x's dtype
    (base_out (..., m1·m2) or None must be in it). Returns y (..., m1·m2), never a view (`kronecker_torch.
    apply_kronecker_op` crops it). Saves x laid out for the run problem and Zₘ per component only for the run
    problem's dB and dA that read them. Once differentiable, like the other Kronecker ops.

    Every reshape of x, y and their gradients happens inside the node: outside, each would be an autograd node of
    its own, and at a few tokens a layer's step costs its op count.
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, base_out: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        R, m1, n1 = A.shape
        _, m2, n2 = B.shape
        y, T = op_output(x, A, B, base_out)  # (..., m1·m2), written through views
        d_in = x.shape[-1]
        a, b = as_dtype(A, x.dtype), as_dtype(B, x.dtype)
        transposed = kronecker_a_first(m1, n1, m2, n2)
        X = pad_columns(x.reshape(T, d_in), n1 * n2)  # (..., d_in) -> (T, n1·n2), zero columns meet padded factors
        if transposed:  # the run problem: X_tᵀ (T, n2, n1) with factors (B, A); its Yᵀ rows (t, j) are y's rows
            X, (a, b), (m1, n1, m2, n2) = _swap_last(X, n1, n2), (b, a), (m2, n2, m1, n1)
            rows = y.view(T * m2, m1)
        else:  # B first: Yᵀ (T·m2, m1) is accumulated apart and swapped into y's (T, m1, m2) once
            rows = None
        X = X.reshape(T * n1, n2)  # (T, n1·n2) -> (T·n1, n2)
        into = None  # base_out as the accumulation reads it
        if base_out is not None:  # (..., m1·m2) -> Yᵀ rows (T·m2, m1) (A first, run sizes) or (T, m1, m2)
            into = base_out.reshape(T * m2, m1) if transposed else base_out.reshape(T, m1, m2)
        acc: Optional[Tensor] = None
        saved = []
        for a_k, b_k in zip(a.unbind(0), b.unbind(0)):
            # Z = X B_kᵀ: (T·n1, n2) @ (n2, m2) -> (T, n1, m2); Zₘ: (n1, T, m2) -> (n1, T·m2)
            saved.append(_swap_outer(X @ b_k.T, T, n1, m2).view(n1, T * m2))
            z = saved[-1].T  # Yᵀ += Zₘᵀ A_kᵀ: (T·m2, n1) @ (n1, m1) -> (T·m2, m1)
            if acc is not None:
                acc.addmm_(z, a_k.T)
            elif rows is None:
                acc = z @ a_k.T
            else:  # A first: straight into y, onto base_out
                acc = torch.mm(z, a_k.T, out=rows) if into is None else torch.addmm(into, z, a_k.T, out=rows)
        if acc is None:  # R = 0: base_out or zeros
            if base_out is None:
                y.zero_()
            else:
                y.copy_(base_out)
        elif rows is None:  # B first: (T, m2, m1) -> (T, m1, m2), base_out added by the same op
            swapped = acc.view(T, m2, m1).transpose(1, 2)
            if into is None:
                y.view(T, m1, m2).copy_(swapped)
            else:
                torch.add(into, swapped, out=y.view(T, m1, m2))
        ctx.transposed, ctx.x_shape, ctx.dtypes = transposed, x.shape, (A.dtype, B.dtype)
        save_for_factor_grads(ctx, transposed, X, a, b, saved)  # A first: the run problem's dB is dA
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        X, a, b, *saved = ctx.saved_tensors
        need_x, need_a, need_b, need_base = ctx.needs_input_grad
        R, m1, n1 = a.shape  # the run problem's sizes
        _, m2, n2 = b.shape
        transposed = ctx.transposed
        T = grad_y.numel() // (m1 * m2)
        need_run_a, need_run_b = (need_b, need_a) if transposed else (need_a, need_b)
        # G' = the run problem's G_tᵀ rows (T·m2, m1): y's layout for A first, one copy for B first
        G = grad_y.reshape(T * m2, m1) if transposed else _swap_last(grad_y, m1, m2).view(T * m2, m1)
        grad_x: Optional[Tensor] = None
        grad_a, grad_b = [], []
        for a_k, b_k, z in zip(a.unbind(0), b.unbind(0), saved):
            if need_run_a:  # dA_kᵀ = Zₘ G': (n1, T·m2) @ (T·m2, m1)
                grad_a.append((z @ G).T)  # (m1, n1), laid out by stack_components
            if need_x or need_run_b:  # Wₘ = A_kᵀ G'ᵀ: (n1, m1) @ (m1, T·m2); W' = (n1, T, m2) -> (T, n1, m2) -> (T·n1, m2)
                W = _swap_outer(a_k.T @ G.T, n1, T, m2).view(T * n1, m2)
                if need_x:  # dX += W' B_k: (T·n1, m2) @ (m2, n2)
                    grad_x = W @ b_k if grad_x is None else grad_x.addmm_(W, b_k)
                if need_run_b:  # dB_k = W'ᵀ X: (m2, T·n1) @ (T·n1, n2)
                    grad_b.append(W.T @ X)
        if need_x:
            if grad_x is None:  # R = 0
                grad_x = grad_y.new_zeros(T * n1, n2)
            # the run problem's dX_t (T·n1, n2) -> x's layout (A first: X_tᵀ back, one copy), then x's shape
            grad_x = input_grad(_swap_last(grad_x, n1, n2) if transposed else grad_x, T, ctx.x_shape)
        run_a = stack_components(grad_a) if grad_a else torch.zeros_like(a) if need_run_a else None  # (R, m1, n1)
        run_b = stack_components(grad_b) if grad_b else torch.zeros_like(b) if need_run_b else None
        grad_A, grad_B = (run_b, run_a) if transposed else (run_a, run_b)
        return (grad_x, as_dtype(grad_A, ctx.dtypes[0]), as_dtype(grad_B, ctx.dtypes[1]),
                grad_y if need_base else None)


def kronecker_linear_gemm(x: Tensor, A: Tensor, B: Tensor, base_out: Optional[Tensor] = None,
                          out_features: Optional[int] = None) -> Tensor:
    """`kernels.kronecker_linear`'s torch op on CPU (`KroneckerGemmFunction` by `kronecker_torch.apply_kronecker_op`;
    shapes as `kronecker_linear` validates them)."""
    return apply_kronecker_op(KroneckerGemmFunction, x, A, B, base_out, out_features)
