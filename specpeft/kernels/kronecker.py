"""Kronecker adapter op (SoKA): y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ, never forming A_k ⊗ B_k.

Shapes: A (R, m1, n1), B (R, m2, n2), x (..., d_in) with d_in ≤ n1·n2, y (..., d_out) with d_out ≤ m1·m2. Row t of
x, zero-padded to n1·n2 and viewed row-major as X_t (n1×n2), gives (performance anchors §2.2)

    Y_t = Σ_k A_k X_t B_kᵀ  (m1×m2),   y_t = vec(Y_t)[:d_out]        ((A⊗B) vec(X) = vec(A X Bᵀ), row-major vec)

so SoKA's zero padding of prime dimensions costs no copy: the kernel masks the padded columns and rows.

Triton path: one program per (token, tile of Y_t). For each component it computes W = X_t B_kᵀ tile by tile in
registers and accumulates A_k W, then adds base_out in the epilogue: one read of x, one write of y, the T×(n1·m2)
intermediate never leaves the chip. The contraction order (B first or A first) is the cheaper one per token, the
other order runs the same kernel on the transposed problem Y_tᵀ = Σ_k B_k X_tᵀ A_kᵀ.
Backward: dX_t = Σ_k A_kᵀ dY_t B_k is the same kernel on (Aᵀ, Bᵀ); dA_k = Σ_t dY_t B_k X_tᵀ and
dB_k = Σ_t dY_tᵀ A_k X_t are reductions over all tokens into R·(m1n1 + m2n2) numbers: 2-D torch GEMMs over token
chunks in x's dtype, like the forward (`kronecker_torch.kronecker_factor_grads`; a fused kernel would need a
cross-program reduction per factor).
Torch path: on CUDA `kronecker_torch.kronecker_linear_bmm`, batched GEMMs over the tokens with the factor broadcast
and a hand-written backward that lays out one T-sized tensor anew (B first; A first one per component more), where
an earlier hand-written backward with four einsums permuted several and ran 1.4-2.2× slower than autograd; on CPU
`kronecker_gemm.kronecker_linear_gemm`, 2-D GEMMs and layout copies with a hand-written backward (45 aten ops a
step with views against the einsums' 78; MKL runs the batched small GEMMs slowly). `kronecker_linear_reference`,
two einsums under autograd, is the oracle.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..init.tucker_cost import kronecker_a_first
from ._dispatch import (HAS_TRITON, BackendChoice, as_base_rows, as_rows, dot_precision, interpreting, kernel_backend,
                        next_power_of_2)
from .kronecker_gemm import kronecker_linear_gemm
from .kronecker_torch import kronecker_factor_grads, kronecker_linear_bmm

__all__ = ["KroneckerLinearFunction", "kronecker_linear", "kronecker_linear_reference"]

GPU_BLOCK_MAX, GPU_WARPS = 64, 8  # compiled launch: tiles up to 64 (209 registers, no spill on sm_90)


def _check(x: Tensor, A: Tensor, B: Tensor, out_features: Optional[int]) -> tuple[int, int]:
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]:
        raise ValueError(f"kronecker_linear: A {tuple(A.shape)} and B {tuple(B.shape)} must be (R, m1, n1) and "
                         "(R, m2, n2) with the same number R of components.")
    _, m1, n1 = A.shape
    _, m2, n2 = B.shape
    d_in = x.shape[-1]
    d_out = m1 * m2 if out_features is None else out_features
    if not 0 < d_in <= n1 * n2 or not 0 < d_out <= m1 * m2:
        raise ValueError(f"kronecker_linear: input features {d_in} / out_features {d_out} must be in (0, n1·n2 = "
                         f"{n1 * n2}] / (0, m1·m2 = {m1 * m2}] for factors {tuple(A.shape[1:])}⊗{tuple(B.shape[1:])}.")
    return d_in, d_out


def kronecker_linear_reference(
    x: Tensor, A: Tensor, B: Tensor, *, base_out: Optional[Tensor] = None, out_features: Optional[int] = None,
) -> Tensor:
    """Eager torch form of `kronecker_linear` (the oracle): two einsums per call, autograd for the backward."""
    d_in, d_out = _check(x, A, B, out_features)
    _, m1, n1 = A.shape
    _, m2, n2 = B.shape
    a, b = A.to(x.dtype), B.to(x.dtype)
    rows = x.reshape(-1, d_in)  # (..., d_in) -> (T, d_in)
    if d_in < n1 * n2:
        rows = F.pad(rows, (0, n1 * n2 - d_in))  # zero columns meet the padded factor columns
    X = rows.reshape(-1, n1, n2)  # (T, n1·n2) -> (T, n1, n2)
    if kronecker_a_first(*A.shape[1:], *B.shape[1:]):
        Z = torch.einsum("kip,tpq->tkiq", a, X)  # (T, R, m1, n2)
        Y = torch.einsum("tkiq,kjq->tij", Z, b)  # (T, m1, m2)
    else:
        Z = torch.einsum("tpq,kjq->tkpj", X, b)  # (T, R, n1, m2)
        Y = torch.einsum("kip,tkpj->tij", a, Z)  # (T, m1, m2)
    out = Y.reshape(-1, m1 * m2)[:, :d_out].reshape(*x.shape[:-1], d_out)  # (T, m1, m2) -> (..., d_out)
    return out if base_out is None else base_out + out


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import INTERPRET_BLOCK, mma

    @triton.jit
    def _kron_kernel(
        x_ptr, a_ptr, b_ptr, base_ptr, y_ptr, R, M1, N1, M2, N2, D_IN, D_OUT,
        stride_xt, stride_xp, stride_xq, stride_ak, stride_ai, stride_ap, stride_bk, stride_bj, stride_bq,
        stride_base, stride_yt, stride_yi, stride_yj,
        HAS_BASE: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Y_t[i, j] = Σ_k Σ_p A_k[i, p] Σ_q X_t[p, q] B_k[j, q] for one token t and one (BI, BJ) tile.

        X_t[p, q] sits at offset p·stride_xp + q·stride_xq of row t, Y_t[i, j] at i·stride_yi + j·stride_yj; offsets
        ≥ D_IN / D_OUT are the zero padding (not read / not written).
        """
        t = tl.program_id(0)
        ri = tl.program_id(1) * BI + tl.arange(0, BI)
        rj = tl.program_id(2) * BJ + tl.arange(0, BJ)
        x_row = x_ptr + t.to(tl.int64) * stride_xt
        acc = tl.zeros((BI, BJ), dtype=tl.float32)
        for k in range(R):
            for p0 in range(0, N1, BP):
                rp = p0 + tl.arange(0, BP)
                w = tl.zeros((BP, BJ), dtype=tl.float32)
                for q0 in range(0, N2, BQ):
                    rq = q0 + tl.arange(0, BQ)
                    x_off = rp[:, None] * stride_xp + rq[None, :] * stride_xq
                    xt = tl.load(x_row + x_off, mask=(rp[:, None] < N1) & (rq[None, :] < N2) & (x_off < D_IN),
                                 other=0.0)
                    bt = tl.load(b_ptr + k * stride_bk + rq[:, None] * stride_bq + rj[None, :] * stride_bj,
                                 mask=(rq[:, None] < N2) & (rj[None, :] < M2), other=0.0)
                    w = mma(xt, bt, w, UPCAST, PRECISION)  # X_t B_kᵀ tile: (BP, BJ)
                at = tl.load(a_ptr + k * stride_ak + ri[:, None] * stride_ai + rp[None, :] * stride_ap,
                             mask=(ri[:, None] < M1) & (rp[None, :] < N1), other=0.0)
                acc = mma(at, w.to(a_ptr.dtype.element_ty), acc, UPCAST, PRECISION)
        y_off = ri[:, None] * stride_yi + rj[None, :] * stride_yj
        mask = (ri[:, None] < M1) & (rj[None, :] < M2) & (y_off < D_OUT)
        if HAS_BASE:
            acc += tl.load(base_ptr + t.to(tl.int64) * stride_base + y_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + t.to(tl.int64) * stride_yt + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _block(size: int) -> int:
    return INTERPRET_BLOCK if interpreting() else min(max(next_power_of_2(size), 16), GPU_BLOCK_MAX)


def _kron_apply(x: Tensor, a: Tensor, b: Tensor, d_out: int, base: Optional[Tensor]) -> Tensor:
    """Y_t = Σ_k a_k X_t b_kᵀ for every row t of x (T, d_in ≤ n1·n2) → (T, d_out); a (R, m1, n1), b (R, m2, n2) are
    any strided views (the backward passes transposes)."""
    T, d_in = x.shape
    R, m1, n1 = a.shape
    _, m2, n2 = b.shape
    y = torch.empty(T, d_out, device=x.device, dtype=x.dtype)
    if T == 0:
        return y
    # B first on (X_t, a, b); A first is the same kernel on the transposed problem (X_tᵀ, b, a) -> Y_tᵀ.
    x_strides, y_strides = (n2, 1), (m2, 1)
    if kronecker_a_first(*a.shape[1:], *b.shape[1:]):
        a, b = b, a
        m1, n1, m2, n2 = m2, n2, m1, n1
        x_strides, y_strides = x_strides[::-1], y_strides[::-1]
    dummy = x
    bi, bj, bp, bq = _block(m1), _block(m2), _block(n1), _block(n2)
    grid = (T, triton.cdiv(m1, bi), triton.cdiv(m2, bj))
    _kron_kernel[grid](
        x, a, b, base if base is not None else dummy, y, R, m1, n1, m2, n2, d_in, d_out,
        x.stride(0), *x_strides, *a.stride(), *b.stride(), base.stride(0) if base is not None else 0, y.stride(0),
        *y_strides, HAS_BASE=base is not None, BI=bi, BJ=bj, BP=bp, BQ=bq, UPCAST=interpreting(),
        PRECISION=dot_precision(x.dtype), num_warps=GPU_WARPS,
    )
    return y


class KroneckerLinearFunction(torch.autograd.Function):
    """Triton forward/backward of `kronecker_linear` on 2-D inputs x (T, d_in), base_out (T, d_out)."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, base_out: Optional[Tensor], d_out: int):  # type: ignore[override]
        a, b = A.to(x.dtype), B.to(x.dtype)
        y = _kron_apply(x, a, b, d_out, base_out)
        ctx.save_for_backward(x if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) else None, a, b)
        ctx.dtypes, ctx.d_in = (A.dtype, B.dtype), x.shape[1]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, a, b = ctx.saved_tensors
        need_x, need_a, need_b, need_base, _ = ctx.needs_input_grad
        gy = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
        grad_x = grad_a = grad_b = None
        if need_x:  # dX_t = Σ_k A_kᵀ dY_t B_k: the forward kernel on the transposed factors
            grad_x = _kron_apply(gy, a.transpose(1, 2), b.transpose(1, 2), ctx.d_in, None)
        if need_a or need_b:
            grad_a, grad_b = kronecker_factor_grads(x, gy, a, b, need_a, need_b)
            grad_a = None if grad_a is None else grad_a.to(ctx.dtypes[0])
            grad_b = None if grad_b is None else grad_b.to(ctx.dtypes[1])
        return grad_x, grad_a, grad_b, (grad_y if need_base else None), None


def kronecker_linear(
    x: Tensor, A: Tensor, B: Tensor, *, base_out: Optional[Tensor] = None, out_features: Optional[int] = None,
    backend: Optional[BackendChoice] = None,
) -> Tensor:
    """y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ[:, :d_in] cropped to `out_features` (module docstring).

    Args:
        x: (..., d_in), d_in ≤ n1·n2 (the missing columns are SoKA's zero padding).
        A: (R, m1, n1); B: (R, m2, n2); cast to x's dtype.
        base_out: (..., d_out) base-layer output added in the kernel's epilogue, or None.
        out_features: d_out ≤ m1·m2 (default m1·m2).
        backend: "triton" / "torch" / "auto" override (see `kernel_backend`).

    Returns:
        (..., d_out).
    """
    d_in, d_out = _check(x, A, B, out_features)
    if kernel_backend(x, A, B, backend=backend) == "torch":
        if x.is_cuda:
            return kronecker_linear_bmm(x, A, B, base_out=base_out, out_features=out_features)
        return kronecker_linear_gemm(x, A, B, base_out=base_out, out_features=out_features)
    rows = as_rows(x, d_in, "kronecker_linear x")  # (..., d_in) -> (T, d_in)
    base_rows = as_base_rows(base_out, rows, d_out, "kronecker_linear base_out")  # (..., d_out) -> (T, d_out)
    y = KroneckerLinearFunction.apply(rows, A, B, base_rows, d_out)
    return y.reshape(*x.shape[:-1], d_out)  # (T, d_out) -> (..., d_out)
