"""SNELLA op: y = x (W + s·K_eff)ᵀ + b with the kernel matrix K computed tile by tile (spec tera_fedsvd_snella §3.1).

Weight layout (out j, in i) = (m, n); A = in_qs (H, n, r), B = out_qs (H, m, r), head coefficients c_h:

    dist_h[j, i] = sqrt(max(‖B_h[j]‖² + ‖A_h[i]‖² − 2 B_h[j]·A_h[i], ε)),   D = Σ_h c_h dist_h
    K = D + α softmax_j(D[:, i] / γ) + β      (kernel "snella"; softmax over the outputs j of each input i)
    K = D                                    (kernel "snell")
    M = 1[|K| > τ]                            (τ: the threshold of the kept count, computed by the caller)
    M = keep_mask                            (the caller's explicit boolean mask, e.g. an exact top-k; overrides τ)
    K_eff = K ⊙ |K|_sg ⊙ M ("code")  or  K ⊙ M ("binary")

Triton path — neither K nor ΔW is ever written or saved; autograd keeps x, the factors and 2n column statistics:
    forward  1. column statistics of the softmax (max and Σ exp over j per column i, online over row tiles): 2n floats;
             2. one GEMM over x whose weight tiles W + s·K_eff are generated in registers from the factor tiles
                (tensor-core dot over r per head) and never stored. With `materialize=True` the same generator
                writes W + s·K_eff once into a transient buffer in x's dtype and cuBLAS runs the GEMM: cheaper when
                the token count is large (the fused GEMM regenerates each tile once per block of BM tokens).
    backward recomputes everything from the factors and the saved column statistics:
             dx = dY (W + s·K_eff) (the fused GEMM, transposed);
             pass 1: each program owns a (j, i) tile of dΔ = dYᵀ x (reduced over the tokens in registers below
                `DENSE_GRAD_MIN_TOKENS` tokens; above, read from one transient library GEMM: the Pattern-B floor of
                performance.md §2.5), regenerates K, and pushes the chain rule into the factor gradients with
                atomics (∂B_h = rowsum(E) B_h − E A_h, ∂A_h = colsum(E) A_h − Eᵀ B_h, E = c_h ∂D ⊘ dist_h) plus the
                scalar gradients;
             pass 2: the softmax's column term −(α/γ) P ⊙ colsum(G ⊙ P), which needs pass 1 complete.
The mask is |K| > τ, or the caller's `keep_mask`, packed to 1 bit per entry (m·⌈n/8⌉ bytes, saved for backward:
1/32 of an fp32 K). An exact top-k needs the explicit mask: the kernels regenerate K with their own rounding (tf32x3
dots on GPU), so entries within a few ulps of τ can land on the other side of |K| > τ than in the caller's K, and at
large m·n the gaps between neighbouring |K| values are far below that rounding (adapters/snella.py).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import (
    HAS_TRITON,
    BackendChoice,
    as_dtype,
    as_rows,
    autocast_dtype,
    autocast_off,
    backward_without_autocast,
    check_bias,
    interpreting,
    kernel_backend,
    matmul_fp32_out,
    next_power_of_2,
)

__all__ = ["SNELLALinearFunction", "pack_mask_bits", "snella_kernel_matrix", "snella_linear",
           "snella_linear_reference"]

KernelKind = Literal["snella", "snell"]
MaskMode = Literal["code", "binary"]
DIST_EPS = 1e-12  # clamp on squared distances, as adapters/snella_kernel.py (cdist's gradient is NaN at 0)
GEN_PRECISION = "tf32x3"  # K-generation dots on GPU: ≈ fp32 accuracy on tensor cores (masks must match the reference)
DENSE_GRAD_MIN_TOKENS = 512  # from here on dΔ = dYᵀx is one library GEMM (see `_Generator.factor_grads`)
# Compiled launch configs (sm_90 register budgets checked offline with `benchmarks/kernel_speed.py --compile-check`):
GPU_GEMM = (128, 128, 32, 8)  # BM, BN, BK, warps of the generating GEMM
GPU_BUILD = (64, 64, 8)  # BJ, BI, warps of the build kernel (`materialize`)
GPU_TILE = (32, 32, 4)  # BJ, BI, warps of the gradient passes (64×64 spills registers)
GPU_STATS = (64, 32, 4)  # BJ, BI, warps of the column statistics
GPU_TOKENS = 64  # BT, the token block of pass 1's own reduction


def snella_kernel_matrix(
    in_qs: Tensor, out_qs: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
    coeffs: Sequence[float] = (0.1, -0.1), kernel: KernelKind = "snella",
) -> Tensor:
    """The dense kernel matrix K (m, n), differentiable, fp32 (fp64 for fp64 factors); callers use |K| to pick τ."""
    compute = torch.promote_types(in_qs.dtype, torch.float32)
    D = None
    for h, c in enumerate(coeffs):
        a, b = in_qs[h].to(compute), out_qs[h].to(compute)  # (n, r), (m, r)
        sq = (b * b).sum(1)[:, None] + (a * a).sum(1)[None, :] - 2.0 * (b @ a.T)  # (m, n)
        term = c * sq.clamp(min=DIST_EPS).sqrt()
        D = term if D is None else D + term
    if kernel == "snell":
        return D
    return D + alpha * torch.softmax(D / gamma, dim=0) + beta


def pack_mask_bits(mask: Tensor) -> Tensor:
    """Pack a boolean (m, n) mask into uint8 (m, ⌈n/8⌉): entry (j, i) is bit i mod 8 of byte [j, i // 8]."""
    m, n = mask.shape
    padded = torch.zeros(m, -(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :n] = mask
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.view(m, -1, 8) * weights).sum(-1, dtype=torch.uint8)  # (m, n/8, 8) -> (m, n/8): disjoint bits


def snella_linear_reference(
    x: Tensor, in_qs: Tensor, out_qs: Tensor, scale: Tensor, tau: Optional[float] = None, *,
    alpha: Optional[Tensor] = None, gamma: Optional[Tensor] = None, beta: Optional[Tensor] = None,
    coeffs: Sequence[float] = (0.1, -0.1), kernel: KernelKind = "snella", mask_mode: MaskMode = "code",
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, keep_mask: Optional[Tensor] = None,
) -> Tensor:
    """Eager torch form of `snella_linear` (dense K, autograd): y = F.linear(x, (W + s·K_eff) in x's dtype, b)."""
    K = snella_kernel_matrix(in_qs, out_qs, alpha, gamma, beta, coeffs, kernel)
    magnitude = K.detach().abs()
    mask = keep_mask if keep_mask is not None else magnitude > (-math.inf if tau is None else tau)
    keff = K * (magnitude * mask) if mask_mode == "code" else K * mask
    merged = scale * keff if weight is None else weight.to(keff.dtype) + scale * keff
    return F.linear(x, merged.to(x.dtype), None if bias is None else bias.to(x.dtype))


if HAS_TRITON:
    import triton

    from ._snella_kernels import (
        _build_kernel,
        _column_stats_kernel,
        _gemm_kernel,
        _grad_pass1_kernel,
        _grad_pass2_kernel,
    )
    from ._triton_common import INTERPRET_BLOCK


class _Generator:
    """The operands every SNELLA kernel reads to regenerate K: fp32 factors, scalars, column statistics."""

    def __init__(self, in_qs: Tensor, out_qs: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor],
                 beta: Optional[Tensor], scale: Tensor, tau: float, coeffs: Sequence[float], kernel: KernelKind,
                 mask_mode: MaskMode, bits: Optional[Tensor] = None) -> None:
        self.a = in_qs.detach().float().contiguous()  # (H, n, r)
        self.b = out_qs.detach().float().contiguous()  # (H, m, r)
        self.heads, self.n, self.width = self.a.shape
        self.m = self.b.shape[1]
        device = self.a.device
        self.c = torch.tensor([float(c) for c in coeffs], device=device, dtype=torch.float32)
        self.is_mix, self.code, self.tau = kernel == "snella", mask_mode == "code", float(tau)
        scalar = lambda t: self.a if t is None else t.detach().float().reshape(1)  # noqa: E731  (dummy when unused)
        self.alpha, self.gamma, self.beta, self.scale = scalar(alpha), scalar(gamma), scalar(beta), scalar(scale)
        self.cmax = self.csum = self.a
        self.bits = self.a if bits is None else bits  # packed keep mask (m, ⌈n/8⌉) uint8, or a dummy pointer
        self.has_bits, self.bits_stride = bits is not None, 0 if bits is None else bits.stride(0)
        self.upcast = interpreting()
        self.br = max(16, next_power_of_2(self.width))

    def common(self) -> tuple:
        return (self.a, self.b, self.c, self.alpha, self.gamma, self.beta, self.cmax, self.csum)

    def strides(self) -> tuple[int, int, int, int]:
        return self.a.stride(0), self.a.stride(1), self.b.stride(0), self.b.stride(1)

    def tile(self) -> tuple[int, int, int]:
        return (INTERPRET_BLOCK, INTERPRET_BLOCK, 4) if self.upcast else GPU_TILE

    def compute_stats(self) -> None:
        """The softmax's column max and Σ exp (2n floats); nothing for the "snell" kernel."""
        if not self.is_mix:
            return
        self.cmax = torch.empty(self.n, device=self.a.device, dtype=torch.float32)
        self.csum = torch.empty_like(self.cmax)
        bj, bi, warps = (INTERPRET_BLOCK, INTERPRET_BLOCK, 4) if self.upcast else GPU_STATS
        _column_stats_kernel[(triton.cdiv(self.n, bi),)](
            self.a, self.b, self.c, self.gamma, self.cmax, self.csum, self.m, self.n, self.heads, self.width,
            *self.strides(), BJ=bj, BI=bi, BR=self.br, UPCAST=self.upcast, PRECISION=GEN_PRECISION, num_warps=warps)

    def gemm(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], transposed: bool) -> Tensor:
        """x W'ᵀ + b (forward) or x W' (transposed, dx) with W' generated per tile inside the GEMM."""
        T = x.shape[0]
        n_out = self.n if transposed else self.m
        y = torch.empty(T, n_out, device=x.device, dtype=x.dtype)
        if T == 0:
            return y
        bm, bn, bk, warps = (INTERPRET_BLOCK, INTERPRET_BLOCK, INTERPRET_BLOCK, 4) if self.upcast else GPU_GEMM
        w0 = weight.contiguous() if weight is not None else x  # the kernel reads rows with unit inner stride
        grid = (triton.cdiv(T, bm), triton.cdiv(n_out, bn))
        _gemm_kernel[grid](
            x, *self.common(), self.scale, self.tau, self.bits, w0, bias if bias is not None else x, y, T, self.m,
            self.n, self.heads, self.width, x.stride(0), *self.strides(), self.bits_stride, w0.stride(0), y.stride(0),
            TRANSPOSED=transposed, IS_MIX=self.is_mix, CODE=self.code, HAS_BITS=self.has_bits,
            HAS_W0=weight is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, BR=self.br,
            UPCAST=self.upcast, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            GEN_PREC=GEN_PRECISION, num_warps=warps)
        return y

    def build(self, weight: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """W + s·K_eff (m, n) in `dtype`, written tile by tile (the `materialize` path's transient weight)."""
        out = torch.empty(self.m, self.n, device=self.a.device, dtype=dtype)
        bj, bi, warps = (INTERPRET_BLOCK, INTERPRET_BLOCK, 4) if self.upcast else GPU_BUILD
        w0 = weight.contiguous() if weight is not None else out
        _build_kernel[(triton.cdiv(self.m, bj), triton.cdiv(self.n, bi))](
            *self.common(), self.scale, self.tau, self.bits, w0, out, self.m, self.n, self.heads, self.width,
            *self.strides(), self.bits_stride, w0.stride(0), out.stride(0), IS_MIX=self.is_mix, CODE=self.code,
            HAS_BITS=self.has_bits, HAS_W0=weight is not None, BJ=bj, BI=bi, BR=self.br,
            UPCAST=self.upcast, GEN_PREC=GEN_PRECISION, num_warps=warps)
        return out

    def factor_grads(self, x: Tensor, gy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(∂in_qs, ∂out_qs, scalars [∂s, ∂α, ∂β, ∂γ]) by passes 1 and 2 (module docstring).

        From `DENSE_GRAD_MIN_TOKENS` tokens on, dΔ = dYᵀx runs as one library GEMM into a transient fp32 (m, n)
        buffer and pass 1 reads its tiles: a reduction over thousands of tokens needs the large tiles of a tuned
        GEMM, which pass 1's register-heavy epilogue cannot afford. The buffer is fp32 (16-bit inputs, fp32 output)
        because ∂s = ⟨dΔ, K_eff⟩ cancels: a bf16 dΔ costs it ~2 % relative accuracy. Below the threshold, pass 1
        reduces over the tokens itself and nothing m×n is allocated.
        """
        grad_a, grad_b = torch.zeros_like(self.a), torch.zeros_like(self.b)
        sums = torch.zeros(5, device=self.a.device, dtype=torch.float32)
        colc = torch.zeros(self.n, device=self.a.device, dtype=torch.float32)
        bj, bi, warps = self.tile()
        bt = INTERPRET_BLOCK if self.upcast else GPU_TOKENS
        grid = (triton.cdiv(self.m, bj), triton.cdiv(self.n, bi))
        dense = x.shape[0] >= DENSE_GRAD_MIN_TOKENS
        grad_delta = matmul_fp32_out(gy.T, x) if dense else self.a  # (m, T) @ (T, n) -> (m, n) fp32, or a dummy
        _grad_pass1_kernel[grid](
            x, gy, grad_delta, *self.common(), self.scale, self.tau, self.bits, grad_a, grad_b, sums, colc,
            x.shape[0], self.m, self.n, self.heads, self.width, x.stride(0), gy.stride(0), *self.strides(),
            self.bits_stride, IS_MIX=self.is_mix, CODE=self.code, HAS_BITS=self.has_bits, DENSE_GRAD=dense, BJ=bj,
            BI=bi, BT=bt, BR=self.br, UPCAST=self.upcast,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", GEN_PREC=GEN_PRECISION, num_warps=warps)
        if self.is_mix:
            _grad_pass2_kernel[grid](
                *self.common(), grad_a, grad_b, sums, colc, self.m, self.n, self.heads, self.width, *self.strides(),
                BJ=bj, BI=bi, BR=self.br,
            UPCAST=self.upcast, GEN_PREC=GEN_PRECISION, num_warps=warps)
        if self.is_mix:  # ∂γ = −(α/γ²) (Σ G⊙P⊙D − Σ_i colc_i Σ_j P⊙D)  (softmax over Z = D/γ)
            sums[3] = -(self.alpha[0] / self.gamma[0] ** 2) * (sums[3] - sums[4])
        return grad_a, grad_b, sums[:4]


class SNELLALinearFunction(torch.autograd.Function):
    """Triton forward/backward of `snella_linear` on 2-D x (T, n); saves x, the factors, 2n column stats and the
    packed keep mask (when given)."""

    @staticmethod
    def forward(ctx, x: Tensor, in_qs: Tensor, out_qs: Tensor, alpha: Optional[Tensor],  # type: ignore[override]
                gamma: Optional[Tensor], beta: Optional[Tensor], scale: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], bits: Optional[Tensor], options: tuple) -> Tensor:
        tau, coeffs, kernel, mask_mode, materialize = options
        gen = _Generator(in_qs, out_qs, alpha, gamma, beta, scale, tau, coeffs, kernel, mask_mode, bits)
        gen.compute_stats()
        b = None if bias is None else bias.to(x.dtype)
        if materialize:
            y = F.linear(x, gen.build(weight, x.dtype), b)  # the transient W' is freed on return
        else:
            y = gen.gemm(x, weight, b, transposed=False)
        ctx.save_for_backward(x, in_qs, out_qs, alpha, gamma, beta, scale, weight, gen.cmax, gen.csum, bits)
        ctx.options, ctx.has_bias = options, bias is not None
        return y

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, in_qs, out_qs, alpha, gamma, beta, scale, weight, cmax, csum, bits = ctx.saved_tensors
        tau, coeffs, kernel, mask_mode, materialize = ctx.options
        need = ctx.needs_input_grad
        gen = _Generator(in_qs, out_qs, alpha, gamma, beta, scale, tau, coeffs, kernel, mask_mode, bits)
        gen.cmax, gen.csum = cmax, csum
        gy = grad_y.contiguous()
        grads: list[Optional[Tensor]] = [None] * 11
        if need[0]:
            grads[0] = gy @ gen.build(weight, x.dtype) if materialize else gen.gemm(gy, weight, None, transposed=True)
        if any(need[1:7]):
            grad_a, grad_b, scalars = gen.factor_grads(x, gy)
            grads[1], grads[2] = grad_a.to(in_qs.dtype), grad_b.to(out_qs.dtype)
            for slot, value, index in ((3, alpha, 1), (4, gamma, 3), (5, beta, 2), (6, scale, 0)):
                if value is not None and need[slot]:
                    grads[slot] = scalars[index].reshape(value.shape).to(value.dtype)  # () -> value's shape
        if need[7]:
            grads[7] = (gy.T @ x).to(weight.dtype)  # the base weight's own gradient is dense by nature
        if need[8] and ctx.has_bias:
            grads[8] = gy.sum(0)
        return tuple(grads)


def snella_linear(
    x: Tensor, in_qs: Tensor, out_qs: Tensor, scale: Tensor, tau: Optional[float] = None, *,
    alpha: Optional[Tensor] = None, gamma: Optional[Tensor] = None, beta: Optional[Tensor] = None,
    coeffs: Sequence[float] = (0.1, -0.1), kernel: KernelKind = "snella", mask_mode: MaskMode = "code",
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, keep_mask: Optional[Tensor] = None,
    materialize: bool = False, backend: Optional[BackendChoice] = None,
) -> Tensor:
    """y = x (W + s·K_eff)ᵀ + b, K computed tile by tile and never stored (module docstring).

    Args:
        x: (..., n).
        in_qs: A (H, n, r); out_qs: B (H, m, r); scale: s (0-d); all fp32 trainables (gradients flow to each).
        tau: keep the entries with |K| > τ (None: keep all). The caller picks τ for its kept count.
        alpha, gamma, beta: the mixture's 0-d scalars (required for kernel "snella", ignored for "snell").
        coeffs: head coefficients c_h (H floats, frozen).
        kernel: "snella" (mixture of kernels) or "snell" (difference of distance kernels, p = 2).
        mask_mode: "code" (K ⊙ |K| on kept entries) or "binary" (K on kept entries).
        weight: base weight (m, n) merged on the fly; None for the adapter term alone. bias: (m,).
        keep_mask: boolean (m, n) mask of the kept entries; overrides `tau`. Use it when the kept set must be
            exact (a top-k): the kernels' regenerated K differs from the caller's by rounding, so |K| > τ can flip
            entries next to τ. Packed to 1 bit per entry and saved for backward.
        materialize: write W + s·K_eff once (x's dtype, transient) and use a library GEMM instead of regenerating
            the tiles inside the GEMM; faster when T is much larger than the GEMM's row block.
        backend: "triton" / "torch" / "auto" override (see `kernel_backend`).

    Returns:
        (..., m) in x's dtype.
    """
    if in_qs.dim() != 3 or out_qs.dim() != 3 or in_qs.shape[0] != out_qs.shape[0] or in_qs.shape[2] != out_qs.shape[2]:
        raise ValueError(f"snella_linear: in_qs {tuple(in_qs.shape)} and out_qs {tuple(out_qs.shape)} must be "
                         "(H, n, r) and (H, m, r).")
    heads, n, _ = in_qs.shape
    m = out_qs.shape[1]
    if len(coeffs) != heads:
        raise ValueError(f"snella_linear: {len(coeffs)} coeffs for {heads} heads; pass one c_h per head.")
    if kernel not in ("snella", "snell") or mask_mode not in ("code", "binary"):
        raise ValueError(f"snella_linear: kernel={kernel!r} / mask_mode={mask_mode!r}; use 'snella'|'snell' and "
                         "'code'|'binary'.")
    if kernel == "snella" and (alpha is None or gamma is None or beta is None):
        raise ValueError("snella_linear: kernel 'snella' needs alpha, gamma and beta (0-d tensors).")
    if weight is not None and tuple(weight.shape) != (m, n):
        raise ValueError(f"snella_linear: weight {tuple(weight.shape)} must be ({m}, {n}).")
    check_bias(bias, m, "snella_linear")
    if keep_mask is not None and (keep_mask.dtype != torch.bool or tuple(keep_mask.shape) != (m, n)):
        raise ValueError(f"snella_linear: keep_mask {keep_mask.dtype} {tuple(keep_mask.shape)} must be a bool "
                         f"({m}, {n}) tensor.")
    tau_value = -math.inf if tau is None else float(tau)
    if kernel_backend(x, in_qs, out_qs, weight, backend=backend) == "torch":
        return snella_linear_reference(x, in_qs, out_qs, scale, tau, alpha=alpha, gamma=gamma, beta=beta,
                                       coeffs=coeffs, kernel=kernel, mask_mode=mask_mode, weight=weight, bias=bias,
                                       keep_mask=keep_mask)
    if kernel == "snell":
        alpha = gamma = beta = None
    rows = as_rows(x, n, "snella_linear x")  # (..., n) -> (T, n)
    options = (tau_value, tuple(float(c) for c in coeffs), kernel, mask_mode, bool(materialize))
    bits = None if keep_mask is None else pack_mask_bits(keep_mask)  # (m, n) bool -> (m, ⌈n/8⌉) uint8
    if materialize:  # under autocast the library GEMM runs in autocast's dtype: x cast once, W + s·K_eff built in it
        rows = as_dtype(rows, autocast_dtype(rows))
    with autocast_off(rows.device.type):
        y = SNELLALinearFunction.apply(rows, in_qs, out_qs, alpha, gamma, beta, scale, weight, bias, bits, options)
    return y.reshape(*x.shape[:-1], m)  # (T, m) -> (..., m)
