"""Triton kernels of the SNELLA op (snella.py): the kernel-matrix tile generator and the passes built on it.

Every kernel regenerates tiles of K = Σ_h c_h dist_h (+ α softmax_j(D/γ) + β) from the factor tiles in registers
(a tensor-core dot over the head width r per head) and never writes K: see snella.py for the math and the passes.
"""

import triton
import triton.language as tl

from ._triton_common import mma


@triton.jit
def _factor_tiles(a_ptr, b_ptr, h, rj, ri, M, N, RW, stride_ah, stride_ai, stride_bh, stride_bj,
                  BR: tl.constexpr):
    """B_h[j-tile] (BJ, BR) and A_h[i-tile] (BI, BR), fp32, zero outside the matrices."""
    rr = tl.arange(0, BR)
    b = tl.load(b_ptr + h * stride_bh + rj[:, None] * stride_bj + rr[None, :],
                mask=(rj[:, None] < M) & (rr[None, :] < RW), other=0.0)
    a = tl.load(a_ptr + h * stride_ah + ri[:, None] * stride_ai + rr[None, :],
                mask=(ri[:, None] < N) & (rr[None, :] < RW), other=0.0)
    return b, a


@triton.jit
def _distance(b, a, BJ: tl.constexpr, BI: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dist[j, i] = sqrt(max(‖b_j‖² + ‖a_i‖² − 2 b_j·a_i, ε)): (BJ, BI)."""
    cross = mma(b, tl.trans(a), tl.zeros((BJ, BI), dtype=tl.float32), UPCAST, PRECISION)
    sq = tl.sum(b * b, 1)[:, None] + tl.sum(a * a, 1)[None, :] - 2.0 * cross
    return tl.sqrt(tl.maximum(sq, 1e-12))


@triton.jit
def _kernel_tile(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, rj, ri, M, N, H, RW,
                 stride_ah, stride_ai, stride_bh, stride_bj, IS_MIX: tl.constexpr, BJ: tl.constexpr,
                 BI: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(K, D, P) tiles (BJ, BI) for out rows rj and in columns ri; P = softmax_j(D/γ) from the column stats."""
    D = tl.zeros((BJ, BI), dtype=tl.float32)
    for h in range(H):
        b, a = _factor_tiles(a_ptr, b_ptr, h, rj, ri, M, N, RW, stride_ah, stride_ai, stride_bh, stride_bj, BR)
        D += tl.load(c_ptr + h) * _distance(b, a, BJ, BI, UPCAST, PRECISION)
    if IS_MIX:
        cmax = tl.load(cmax_ptr + ri, mask=ri < N, other=0.0)
        csum = tl.load(csum_ptr + ri, mask=ri < N, other=1.0)
        P = tl.exp(D / tl.load(gamma_ptr) - cmax[None, :]) / csum[None, :]
        K = D + tl.load(alpha_ptr) * P + tl.load(beta_ptr)
    else:
        P = D
        K = D
    return K, D, P


@triton.jit
def _keep_tile(magnitude, tau, bits_ptr, stride_bits, rj, ri, M, N, HAS_BITS: tl.constexpr):
    """The kept entries of a tile: bit (i mod 8) of byte [j, i // 8] of the packed mask when HAS_BITS (the caller's
    exact top-k), else |K| > τ. Out-of-matrix entries read 0 bits."""
    if HAS_BITS:
        byte = tl.load(bits_ptr + rj[:, None] * stride_bits + (ri[None, :] >> 3),
                       mask=(rj[:, None] < M) & (ri[None, :] < N), other=0).to(tl.int32)
        keep = ((byte >> (ri[None, :] & 7)) & 1) != 0
    else:
        keep = magnitude > tau
    return keep


@triton.jit
def _weight_tile(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, scale_ptr, tau, bits_ptr,
                 w0_ptr, rj, ri, M, N, H, RW, stride_ah, stride_ai, stride_bh, stride_bj, stride_bits, stride_w0,
                 IS_MIX: tl.constexpr, CODE: tl.constexpr, HAS_BITS: tl.constexpr, HAS_W0: tl.constexpr,
                 BJ: tl.constexpr, BI: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """(W + s·K_eff)[rj, ri] in fp32: K generated, masked (|K| > τ or the packed mask), scaled, added to W."""
    K, D, P = _kernel_tile(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, rj, ri, M,
                           N, H, RW, stride_ah, stride_ai, stride_bh, stride_bj, IS_MIX, BJ, BI, BR, UPCAST,
                           PRECISION)
    magnitude = tl.abs(K)
    keep = _keep_tile(magnitude, tau, bits_ptr, stride_bits, rj, ri, M, N, HAS_BITS)
    if CODE:
        keff = tl.where(keep, K * magnitude, 0.0)
    else:
        keff = tl.where(keep, K, 0.0)
    w = tl.load(scale_ptr) * keff
    if HAS_W0:
        w += tl.load(w0_ptr + rj[:, None] * stride_w0 + ri[None, :], mask=(rj[:, None] < M) & (ri[None, :] < N),
                     other=0.0).to(tl.float32)
    return w


@triton.jit
def _column_stats_kernel(a_ptr, b_ptr, c_ptr, gamma_ptr, cmax_ptr, csum_ptr, M, N, H, RW, stride_ah, stride_ai,
                         stride_bh, stride_bj, BJ: tl.constexpr, BI: tl.constexpr, BR: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """cmax[i] = max_j D[j, i]/γ and csum[i] = Σ_j exp(D[j, i]/γ − cmax[i]), online over row tiles."""
    ri = tl.program_id(0) * BI + tl.arange(0, BI)
    run_max = tl.full((BI,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BI,), dtype=tl.float32)
    inv_gamma = 1.0 / tl.load(gamma_ptr)
    for j0 in range(0, M, BJ):
        rj = j0 + tl.arange(0, BJ)
        D = tl.zeros((BJ, BI), dtype=tl.float32)
        for h in range(H):
            b, a = _factor_tiles(a_ptr, b_ptr, h, rj, ri, M, N, RW, stride_ah, stride_ai, stride_bh, stride_bj, BR)
            D += tl.load(c_ptr + h) * _distance(b, a, BJ, BI, UPCAST, PRECISION)
        z = tl.where(rj[:, None] < M, D * inv_gamma, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, 0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[None, :]), 0)
        run_max = new_max
    tl.store(cmax_ptr + ri, run_max, mask=ri < N)
    tl.store(csum_ptr + ri, run_sum, mask=ri < N)


@triton.jit
def _gemm_kernel(x_ptr, a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, scale_ptr, tau,
                 bits_ptr, w0_ptr, bias_ptr, y_ptr, T, M, N, H, RW, stride_xt, stride_ah, stride_ai, stride_bh,
                 stride_bj, stride_bits, stride_w0, stride_yt, TRANSPOSED: tl.constexpr, IS_MIX: tl.constexpr,
                 CODE: tl.constexpr, HAS_BITS: tl.constexpr, HAS_W0: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 GEN_PREC: tl.constexpr):
    """y = x W'ᵀ (+ b) with W' = W + s·K_eff (m, n) generated per (BN, BK) tile; TRANSPOSED: y = x W' (dx)."""
    row0 = (tl.program_id(0) * BM).to(tl.int64)  # 64-bit row offset in the base pointers, 32-bit inside the tile
    rt = tl.arange(0, BM)
    mask_t = row0 + rt < T
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    if TRANSPOSED:
        n_out, n_red = N, M
    else:
        n_out, n_red = M, N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, n_red, BK):
        rk = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + row0 * stride_xt + rt[:, None] * stride_xt + rk[None, :],
                     mask=mask_t[:, None] & (rk[None, :] < n_red), other=0.0)
        if TRANSPOSED:  # W'[j = rk, i = rn]: (BK, BN)
            w = _weight_tile(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, scale_ptr,
                             tau, bits_ptr, w0_ptr, rk, rn, M, N, H, RW, stride_ah, stride_ai, stride_bh,
                             stride_bj, stride_bits, stride_w0, IS_MIX, CODE, HAS_BITS, HAS_W0, BK, BN, BR, UPCAST,
                             GEN_PREC)
            acc = mma(xt, w.to(x_ptr.dtype.element_ty), acc, UPCAST, PRECISION)
        else:  # W'[j = rn, i = rk]: (BN, BK)
            w = _weight_tile(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, scale_ptr,
                             tau, bits_ptr, w0_ptr, rn, rk, M, N, H, RW, stride_ah, stride_ai, stride_bh,
                             stride_bj, stride_bits, stride_w0, IS_MIX, CODE, HAS_BITS, HAS_W0, BN, BK, BR, UPCAST,
                             GEN_PREC)
            acc = mma(xt, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < n_out, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row0 * stride_yt + rt[:, None] * stride_yt + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_t[:, None] & (rn[None, :] < n_out))


@triton.jit
def _build_kernel(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, scale_ptr, tau, bits_ptr,
                  w0_ptr, out_ptr, M, N, H, RW, stride_ah, stride_ai, stride_bh, stride_bj, stride_bits, stride_w0,
                  stride_out, IS_MIX: tl.constexpr, CODE: tl.constexpr, HAS_BITS: tl.constexpr, HAS_W0: tl.constexpr,
                  BJ: tl.constexpr,
                  BI: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, GEN_PREC: tl.constexpr):
    """out = W + s·K_eff in out's dtype, one (BJ, BI) tile per program (the `materialize` path)."""
    rj = tl.program_id(0) * BJ + tl.arange(0, BJ)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    w = _weight_tile(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, scale_ptr, tau,
                     bits_ptr, w0_ptr, rj, ri, M, N, H, RW, stride_ah, stride_ai, stride_bh, stride_bj, stride_bits,
                     stride_w0, IS_MIX, CODE, HAS_BITS, HAS_W0, BJ, BI, BR, UPCAST, GEN_PREC)
    tl.store(out_ptr + rj[:, None] * stride_out + ri[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rj[:, None] < M) & (ri[None, :] < N))


@triton.jit
def _push_factor_grads(grad_d, a_ptr, b_ptr, c_ptr, ga_ptr, gb_ptr, rj, ri, M, N, H, RW, stride_ah, stride_ai,
                       stride_bh, stride_bj, BJ: tl.constexpr, BI: tl.constexpr, BR: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """∂B_h += rowsum(E) B_h − E A_h, ∂A_h += colsum(E) A_h − Eᵀ B_h, E = c_h ∂D ⊘ dist_h (0 where clamped)."""
    rr = tl.arange(0, BR)
    zero_bj = tl.zeros((BJ, BR), dtype=tl.float32)
    zero_bi = tl.zeros((BI, BR), dtype=tl.float32)
    for h in range(H):
        b, a = _factor_tiles(a_ptr, b_ptr, h, rj, ri, M, N, RW, stride_ah, stride_ai, stride_bh, stride_bj, BR)
        dist = _distance(b, a, BJ, BI, UPCAST, PRECISION)
        e = tl.where(dist > 1e-6, tl.load(c_ptr + h) * grad_d / dist, 0.0)
        gb = tl.sum(e, 1)[:, None] * b - mma(e, a, zero_bj, UPCAST, PRECISION)
        ga = tl.sum(e, 0)[:, None] * a - mma(tl.trans(e), b, zero_bi, UPCAST, PRECISION)
        tl.atomic_add(gb_ptr + h * stride_bh + rj[:, None] * stride_bj + rr[None, :], gb,
                      mask=(rj[:, None] < M) & (rr[None, :] < RW))
        tl.atomic_add(ga_ptr + h * stride_ah + ri[:, None] * stride_ai + rr[None, :], ga,
                      mask=(ri[:, None] < N) & (rr[None, :] < RW))


@triton.jit
def _grad_pass1_kernel(x_ptr, gy_ptr, gd_ptr, a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr,
                       scale_ptr, tau, bits_ptr, ga_ptr, gb_ptr, scalars_ptr, colc_ptr, T, M, N, H, RW, stride_xt,
                       stride_gt, stride_ah, stride_ai, stride_bh, stride_bj, stride_bits, IS_MIX: tl.constexpr,
                       CODE: tl.constexpr, HAS_BITS: tl.constexpr, DENSE_GRAD: tl.constexpr,
                       BJ: tl.constexpr, BI: tl.constexpr,
                       BT: tl.constexpr,
                       BR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, GEN_PREC: tl.constexpr):
    """One (j, i) tile: dΔ = Σ_t dY[t, j] x[t, i] (reduced in registers, or read from the dense `gd` (m, n) when
    DENSE_GRAD), then the chain rule to every K input.

    scalars = [∂s, ∂α, ∂β, Σ G⊙P⊙D]; colc[i] = Σ_j G⊙P (the softmax's column term, used by pass 2).
    """
    rj = tl.program_id(0) * BJ + tl.arange(0, BJ)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    valid = (rj[:, None] < M) & (ri[None, :] < N)
    if DENSE_GRAD:
        grad_delta = tl.load(gd_ptr + rj[:, None] * N + ri[None, :], mask=valid, other=0.0).to(tl.float32)
    else:
        grad_delta = tl.zeros((BJ, BI), dtype=tl.float32)
        rt = tl.arange(0, BT)
        gy_ptrs = gy_ptr + rt[None, :] * stride_gt + rj[:, None]  # dYᵀ tile pointers: (BJ, BT)
        x_ptrs = x_ptr + rt[:, None] * stride_xt + ri[None, :]  # (BT, BI)
        for t0 in range(0, T, BT):
            gyt = tl.load(gy_ptrs, mask=(rt[None, :] < T - t0) & (rj[:, None] < M), other=0.0)
            xt = tl.load(x_ptrs, mask=(rt[:, None] < T - t0) & (ri[None, :] < N), other=0.0)
            grad_delta = mma(gyt, xt, grad_delta, UPCAST, PRECISION)
            gy_ptrs += BT * stride_gt  # 64-bit pointer arithmetic: no 32-bit offset overflow over long T
            x_ptrs += BT * stride_xt
    K, D, P = _kernel_tile(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, rj, ri, M, N,
                           H, RW, stride_ah, stride_ai, stride_bh, stride_bj, IS_MIX, BJ, BI, BR, UPCAST, GEN_PREC)
    magnitude = tl.abs(K)
    keep = _keep_tile(magnitude, tau, bits_ptr, stride_bits, rj, ri, M, N, HAS_BITS) & valid
    scale = tl.load(scale_ptr)
    if CODE:
        keff = tl.where(keep, K * magnitude, 0.0)
        grad_k = tl.where(keep, scale * grad_delta * magnitude, 0.0)  # ∂L/∂K (|K| is detached)
    else:
        keff = tl.where(keep, K, 0.0)
        grad_k = tl.where(keep, scale * grad_delta, 0.0)
    tl.atomic_add(scalars_ptr, tl.sum(tl.sum(grad_delta * keff, 1), 0))
    if IS_MIX:
        gp = grad_k * P
        tl.atomic_add(scalars_ptr + 1, tl.sum(tl.sum(gp, 1), 0))
        tl.atomic_add(scalars_ptr + 2, tl.sum(tl.sum(grad_k, 1), 0))
        tl.atomic_add(scalars_ptr + 3, tl.sum(tl.sum(gp * D, 1), 0))
        tl.atomic_add(colc_ptr + ri, tl.sum(gp, 0), mask=ri < N)
        grad_d = grad_k + (tl.load(alpha_ptr) / tl.load(gamma_ptr)) * gp
    else:
        grad_d = grad_k
    _push_factor_grads(grad_d, a_ptr, b_ptr, c_ptr, ga_ptr, gb_ptr, rj, ri, M, N, H, RW, stride_ah, stride_ai,
                       stride_bh, stride_bj, BJ, BI, BR, UPCAST, GEN_PREC)


@triton.jit
def _grad_pass2_kernel(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, ga_ptr, gb_ptr,
                       scalars_ptr, colc_ptr, M, N, H, RW, stride_ah, stride_ai, stride_bh, stride_bj,
                       BJ: tl.constexpr, BI: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr,
                       GEN_PREC: tl.constexpr):
    """The softmax's column term: ∂D −= (α/γ) P ⊙ colc[i]; scalars[4] += Σ colc[i] P ⊙ D (for ∂γ)."""
    rj = tl.program_id(0) * BJ + tl.arange(0, BJ)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    K, D, P = _kernel_tile(a_ptr, b_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, cmax_ptr, csum_ptr, rj, ri, M, N,
                           H, RW, stride_ah, stride_ai, stride_bh, stride_bj, True, BJ, BI, BR, UPCAST, GEN_PREC)
    colc = tl.load(colc_ptr + ri, mask=ri < N, other=0.0)
    pc = tl.where((rj[:, None] < M) & (ri[None, :] < N), P * colc[None, :], 0.0)
    tl.atomic_add(scalars_ptr + 4, tl.sum(tl.sum(pc * D, 1), 0))
    grad_d = -(tl.load(alpha_ptr) / tl.load(gamma_ptr)) * pc
    _push_factor_grads(grad_d, a_ptr, b_ptr, c_ptr, ga_ptr, gb_ptr, rj, ri, M, N, H, RW, stride_ah, stride_ai,
                       stride_bh, stride_bj, BJ, BI, BR, UPCAST, GEN_PREC)
