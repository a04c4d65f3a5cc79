"""Low-rank adapter op (SVFit, LoRA shapes): y = x Wᵀ + b + ((x V) ⊙ s) Uᵀ (+ base_out).

Shapes: x (..., k), W (n, k), V (k, r), s (r,), U (n, r) → y (..., n). SVFit passes V = V_r, s = s − σ⁰, U = U_r;
LoRA passes V = Aᵀ, s = (α/r)·1, U = B.

Triton path (LoRAFusion's split, performance anchors §2.1):
    1. shrink  P = x V  (T, r), fp32: the one extra read of x;
    2. main    y = x Wᵀ + (P ⊙ s) Uᵀ + b: one GEMM whose K loop runs over the k columns of x, then over the r
       columns of P ⊙ s, so the scale and the accumulate are fused and no T×n temporary is written.
Backward (P is saved, x only when V or W take a gradient):
    Q = dY U (shrink),  dx = dY W + (Q ⊙ s) Vᵀ (the main kernel on Wᵀ),  ds = Σ_t P ⊙ Q,
    dV = xᵀ (Q ⊙ s),  dU = dYᵀ (P ⊙ s),  dW = dYᵀ x,  db = Σ_t dY.
The last four are reductions over the tokens with r-wide (or dense, frozen-weight-only) outputs: plain torch GEMMs,
which cuBLAS runs at peak; fusing them brings nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import (HAS_TRITON, BackendChoice, as_base_rows, as_rows, check_bias, dot_precision, interpreting,
                        kernel_backend)

__all__ = ["LowRankLinearFunction", "lowrank_linear", "lowrank_linear_reference"]


def lowrank_linear_reference(
    x: Tensor, down: Tensor, scale: Tensor, up: Tensor, *, weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, base_out: Optional[Tensor] = None,
) -> Tensor:
    """Eager torch form of `lowrank_linear` (the CPU path and the oracle); factors are cast to x's dtype."""
    hidden = (x @ down.to(x.dtype)) * scale.to(x.dtype)  # (..., k) @ (k, r) -> (..., r)
    out = hidden @ up.to(x.dtype).T  # (..., r) @ (r, n) -> (..., n)
    if weight is not None:
        out = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype)) + out
    elif bias is not None:
        out = out + bias.to(x.dtype)
    if base_out is not None:
        out = base_out + out
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import INTERPRET_BLOCK, gemm_configs, mma, swizzle

    @triton.jit
    def _shrink_kernel(
        x_ptr, v_ptr, p_ptr, M, K, R,
        stride_xm, stride_xk, stride_vk, stride_vr,
        BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """P[m, r] = Σ_k x[m, k] V[k, r], fp32 output (T, R) contiguous."""
        row0 = tl.program_id(0) * BM
        rm = tl.arange(0, BM)  # local rows: the 64-bit row offset goes into the base pointer
        rr = tl.program_id(1) * BR + tl.arange(0, BR)
        rk = tl.arange(0, BK)
        mask_m = row0 + rm < M
        x_ptrs = x_ptr + row0.to(tl.int64) * stride_xm + rm[:, None] * stride_xm + rk[None, :] * stride_xk
        v_ptrs = v_ptr + rk[:, None] * stride_vk + rr[None, :] * stride_vr
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (rk[None, :] < K - k0), other=0.0)
            b = tl.load(v_ptrs, mask=(rk[:, None] < K - k0) & (rr[None, :] < R), other=0.0)
            acc = mma(a, b, acc, UPCAST, PRECISION)
            x_ptrs += BK * stride_xk
            v_ptrs += BK * stride_vk
        p_ptrs = p_ptr + row0.to(tl.int64) * R + rm[:, None] * R + rr[None, :]
        tl.store(p_ptrs, acc, mask=mask_m[:, None] & (rr[None, :] < R))

    @triton.jit
    def _main_kernel(
        x_ptr, w_ptr, p_ptr, s_ptr, u_ptr, bias_ptr, base_ptr, y_ptr, M, N, K, R,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_un, stride_ur, stride_bm, stride_ym,
        HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """y = x Wᵀ + (P ⊙ s) Uᵀ + b + base: the K loop covers x's k columns, then P's r columns."""
        pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
        row0 = (pid_m * BM).to(tl.int64)  # 64-bit row offset in the base pointers, 32-bit offsets inside the tile
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mask_m = pid_m * BM + rm < M
        mask_n = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if HAS_W:
            rk = tl.arange(0, BK)
            x_ptrs = x_ptr + row0 * stride_xm + rm[:, None] * stride_xm + rk[None, :] * stride_xk
            w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn
            for k0 in range(0, K, BK):
                a = tl.load(x_ptrs, mask=mask_m[:, None] & (rk[None, :] < K - k0), other=0.0)
                b = tl.load(w_ptrs, mask=(rk[:, None] < K - k0) & mask_n[None, :], other=0.0)
                acc = mma(a, b, acc, UPCAST, PRECISION)
                x_ptrs += BK * stride_xk
                w_ptrs += BK * stride_wk
        rr = tl.arange(0, BR)
        p_ptrs = p_ptr + row0 * R + rm[:, None] * R + rr[None, :]
        u_ptrs = u_ptr + rr[:, None] * stride_ur + rn[None, :] * stride_un
        for r0 in range(0, R, BR):
            p = tl.load(p_ptrs, mask=mask_m[:, None] & (rr[None, :] < R - r0), other=0.0)
            s = tl.load(s_ptr + r0 + rr, mask=rr < R - r0, other=0.0)
            hidden = (p * s[None, :]).to(u_ptr.dtype.element_ty)  # the scale, fused: (BM, BR)
            u = tl.load(u_ptrs, mask=(rr[:, None] < R - r0) & mask_n[None, :], other=0.0)
            acc = mma(hidden, u, acc, UPCAST, PRECISION)
            p_ptrs += BR
            u_ptrs += BR * stride_ur
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_BASE:
            acc += tl.load(base_ptr + row0 * stride_bm + rm[:, None] * stride_bm + rn[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        tl.store(y_ptr + row0 * stride_ym + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask)

    _shrink_tuned = triton.autotune(
        configs=[triton.Config({"BM": bm, "BK": bk}, num_warps=4, num_stages=s)
                 for bm in (32, 64, 128) for bk in (64, 128) for s in (3, 4)],
        key=["M", "K", "R"],
    )(_shrink_kernel)
    _main_tuned = triton.autotune(configs=gemm_configs(), key=["M", "N", "K", "R"])(_main_kernel)


def _rank_block(rank: int) -> int:
    return 16 if interpreting() or rank <= 16 else (32 if rank <= 32 else 64)


def _shrink(x: Tensor, v: Tensor) -> Tensor:
    """(T, k) @ (k, r) → (T, r) fp32 through `_shrink_kernel`."""
    M, K = x.shape
    R = v.shape[1]
    out = torch.empty(M, R, device=x.device, dtype=torch.float32)
    if M == 0:
        return out
    br = _rank_block(R)
    args = (x, v, out, M, K, R, x.stride(0), x.stride(1), v.stride(0), v.stride(1))
    if interpreting():
        block = INTERPRET_BLOCK
        grid = (triton.cdiv(M, block), triton.cdiv(R, br))
        _shrink_kernel[grid](*args, BM=block, BK=block, BR=br, UPCAST=True, PRECISION=dot_precision(x.dtype))
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(R, br))  # noqa: E731
        _shrink_tuned[grid](*args, BR=br, UPCAST=False, PRECISION=dot_precision(x.dtype))
    return out


def _main(x: Tensor, w: Optional[Tensor], p: Tensor, s: Tensor, u: Tensor, bias: Optional[Tensor],
          base: Optional[Tensor], out_features: int) -> Tensor:
    """x wᵀ + (p ⊙ s) uᵀ + bias + base through `_main_kernel`; w (N, K) may be any strided view (Wᵀ in backward)."""
    M, K = x.shape
    N, R = out_features, p.shape[1]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    dummy = x
    w_ = w if w is not None else dummy
    args = (
        x, w_, p, s, u, bias if bias is not None else dummy, base if base is not None else dummy, y, M, N, K, R,
        x.stride(0), x.stride(1), w_.stride(0), w_.stride(1), u.stride(0), u.stride(1),
        base.stride(0) if base is not None else 0, y.stride(0),
    )
    flags = dict(HAS_W=w is not None, HAS_BIAS=bias is not None, HAS_BASE=base is not None, BR=_rank_block(R),
                 PRECISION=dot_precision(x.dtype))
    if interpreting():
        block = INTERPRET_BLOCK
        grid = (triton.cdiv(M, block) * triton.cdiv(N, block),)
        _main_kernel[grid](*args, **flags, BM=block, BN=block, BK=block, GROUP_M=4, UPCAST=True)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        _main_tuned[grid](*args, **flags, GROUP_M=8, UPCAST=False)
    return y


class LowRankLinearFunction(torch.autograd.Function):
    """Triton forward/backward of `lowrank_linear` on 2-D inputs x (T, k), base_out (T, n)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], down: Tensor, scale: Tensor, up: Tensor,
        base_out: Optional[Tensor],
    ) -> Tensor:
        dtype = x.dtype
        w = None if weight is None else weight.to(dtype)
        v = down.to(dtype).contiguous()
        u = up.to(dtype).contiguous()
        s = scale.float().contiguous()
        p = _shrink(x, v)  # (T, r) fp32, the unscaled projection (kept: ds needs it even where s = 0)
        b = None if bias is None else bias.to(dtype)
        y = _main(x, w, p, s, u, b, base_out, u.shape[0])
        need_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x if need_x else None, w, v, s, u, p)
        ctx.input_dtypes = (weight.dtype if weight is not None else None, down.dtype, scale.dtype, up.dtype)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, w, v, s, u, p = ctx.saved_tensors
        need_x, need_w, need_b, need_v, need_s, need_u, need_base = ctx.needs_input_grad
        w_dtype, v_dtype, s_dtype, u_dtype = ctx.input_dtypes
        gy = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
        grad_x = grad_w = grad_b = grad_v = grad_s = grad_u = None
        if need_x or need_s or need_v:
            q = _shrink(gy, u)  # dY U: (T, n) @ (n, r) -> (T, r) fp32
            if need_x:  # dY W + (Q ⊙ s) Vᵀ: the main kernel with W read transposed, (k, n) view
                grad_x = _main(gy, None if w is None else w.t(), q, s, v, None, None, v.shape[0])
            if need_s:
                grad_s = (p * q).sum(0).to(s_dtype)  # Σ_t P ⊙ Q: (r,)
            if need_v:
                grad_v = (x.T @ (q * s).to(x.dtype)).to(v_dtype)  # (k, T) @ (T, r) -> (k, r)
        if need_u:
            grad_u = (gy.T @ (p * s).to(gy.dtype)).to(u_dtype)  # (n, T) @ (T, r) -> (n, r)
        if need_w:
            grad_w = (gy.T @ x).to(w_dtype)  # (n, T) @ (T, k) -> (n, k)
        if need_b and ctx.has_bias:
            grad_b = gy.sum(0)
        return grad_x, grad_w, grad_b, grad_v, grad_s, grad_u, (grad_y if need_base else None)


def lowrank_linear(
    x: Tensor, down: Tensor, scale: Tensor, up: Tensor, *, weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, base_out: Optional[Tensor] = None, backend: Optional[BackendChoice] = None,
) -> Tensor:
    """y = x Wᵀ + b + ((x V) ⊙ s) Uᵀ (+ base_out), fused on CUDA (module docstring).

    Args:
        x: (..., k) activations (fp32 / bf16 / fp16); the output has x's dtype.
        down: V (k, r); scale: s (r,); up: U (n, r). Cast to x's dtype (s stays fp32 in the kernel).
        weight: frozen base weight W (n, k), fused into the same GEMM; None for the adapter term alone.
        bias: (n,), added once.
        base_out: (..., n) output of a base layer computed elsewhere (quantized, custom), added in the epilogue.
        backend: "triton" / "torch" / "auto" override (see `kernel_backend`).

    Returns:
        (..., n).
    """
    k, rank = down.shape
    n = up.shape[0]
    if scale.shape != (rank,) or up.shape != (n, rank):
        raise ValueError(f"lowrank_linear: down {tuple(down.shape)}, scale {tuple(scale.shape)} and up "
                         f"{tuple(up.shape)} must be (k, r), (r,) and (n, r).")
    if weight is not None and weight.shape != (n, k):
        raise ValueError(f"lowrank_linear: weight {tuple(weight.shape)} must be (n, k) = ({n}, {k}).")
    check_bias(bias, n, "lowrank_linear")
    if kernel_backend(x, down, up, weight, backend=backend) == "torch":
        return lowrank_linear_reference(x, down, scale, up, weight=weight, bias=bias, base_out=base_out)
    rows = as_rows(x, k, "lowrank_linear x")  # (..., k) -> (T, k)
    base_rows = as_base_rows(base_out, rows, n, "lowrank_linear base_out")  # (..., n) -> (T, n)
    y = LowRankLinearFunction.apply(rows, weight, bias, down, scale, up, base_rows)
    return y.reshape(*x.shape[:-1], n)  # (T, n) -> (..., n)
