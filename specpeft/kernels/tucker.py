"""Tucker / TeRA op: y = x (W + Δ)ᵀ + b with Δ = unfold(𝒢 ×_1 U_1 ×_2 … ×_N U_N) (spec tera_fedsvd_snella §1.2, §1.6).

The d_out×d_in matrix is tensorized into N modes J_k = m_k·n_k (MPO interleaving): Δ[a, b] = 𝒳[j_1..j_N] with
j_k = a_k·n_k + b_k for the row-major multi-indices a = (a_1..a_N), b = (b_1..b_N). Core 𝒢 (R_1..R_N), factors
U_k (J_k, R_k); TeRA passes its scaled factors Ũ_k = diag(λ_k) U_k diag(μ_k).

Write P = 𝒢 ×_1 U_1 … ×_{N−1} U_{N−1}, a (J', R_N) matrix over the outer index j' = (j_1..j_{N−1}) (small: torch,
differentiable). Then, with a = (a', a_N) and b = (b', b_N),

    Δ[(a', a_N), (b', b_N)] = Σ_r P[j'(a', b'), r] · U_N[a_N·n_N + b_N, r]   — the GEMM F = P U_Nᵀ, scattered,
    Δ = Σ_r unfold'(P[:, r]) ⊗ reshape(U_N[:, r], (m_N, n_N))               — R_N Kronecker products.

Two paths (chosen by `tucker_prefers_factored`, spec §1.6's break-even):
    "materialized": a Triton kernel computes F tile by tile (tensor-core dot over r) and writes W' = W + Δ straight
        into the (m, n) layout (index vectors map each F row to its W' row/column offsets), cast to x's dtype; then
        one cuBLAS GEMM on W'. No fp32 Δ, no permute copy. Backward rebuilds W' (never saved): dx = dY W',
        dΔ = dYᵀ x, dP = fold(dΔ) U_N, dU_N = fold(dΔ)ᵀ P (the dΔ GEMM is the floor of any high-rank adapter).
        The torch backend is autograd through the dense Δ (`tucker_linear_reference`); TeRA's merged path with a
        rank-1 last mode avoids dΔ with `kronecker_factors` and `kronecker_merged_linear` (kronecker_torch.py).
    "factored": the Kronecker kernel (kronecker.py) on the R_N products above; Δ is never formed. Wins for small
        R_N or few tokens.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import (
    HAS_TRITON,
    BackendChoice,
    as_base_rows,
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
    widened,
)
from ..init.tucker import last_as_kronecker, outer_as_kronecker, outer_chain
from ..init.tucker_cost import kronecker_apply_macs
from .kronecker import kronecker_linear


__all__ = [
    "TuckerMaterializedFunction",
    "kronecker_factors",
    "tucker_delta",
    "tucker_linear",
    "tucker_linear_reference",
    "tucker_prefers_factored",
]

TuckerMode = Literal["auto", "materialized", "factored"]
GPU_BUILD_BLOCK_OUTER, GPU_BUILD_BLOCK_LAST, GPU_BUILD_WARPS = 64, 128, 8  # compiled build-kernel launch config


def _check(core: Tensor, factors: Sequence[Tensor], out_modes: Sequence[int], in_modes: Sequence[int]) -> None:
    order = core.dim()
    if not len(factors) == len(out_modes) == len(in_modes) == order >= 1:
        raise ValueError(f"tucker_linear: core of order {order} needs {order} factors, out_modes and in_modes; got "
                         f"{len(factors)}, {len(out_modes)}, {len(in_modes)}.")
    for k, (factor, m, n, rank) in enumerate(zip(factors, out_modes, in_modes, core.shape)):
        if tuple(factor.shape) != (m * n, rank):
            raise ValueError(f"tucker_linear: factor {k} has shape {tuple(factor.shape)}, expected "
                             f"(J_{k + 1} = m·n = {m * n}, R_{k + 1} = {rank}) for modes {m}×{n}.")


def _fold_matrix(matrix: Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> Tensor:
    """(m, n) → (J_1, …, J_N), Δ[a, b] = 𝒳[j], j_k = a_k·n_k + b_k."""
    order = len(out_modes)
    split = matrix.reshape(*out_modes, *in_modes)  # (m, n) -> (m_1..m_N, n_1..n_N)
    pairs = split.permute(*[axis for k in range(order) for axis in (k, order + k)])  # -> (m_1, n_1, …, m_N, n_N)
    return pairs.reshape([m * n for m, n in zip(out_modes, in_modes)])  # -> (J_1..J_N)


def _unfold_tensor(tensor: Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> Tensor:
    """(J_1, …, J_N, *batch) → (m, n, *batch), the inverse of `_fold_matrix` on the leading N axes."""
    order, batch = len(out_modes), tuple(tensor.shape[len(out_modes):])
    pairs = tensor.reshape(*[s for m, n in zip(out_modes, in_modes) for s in (m, n)], *batch)  # (m_1, n_1, …)
    rest = list(range(2 * order, 2 * order + len(batch)))
    split = pairs.permute(*range(0, 2 * order, 2), *range(1, 2 * order, 2), *rest)  # (m_1..m_N, n_1..n_N, *batch)
    return split.reshape(math.prod(out_modes), math.prod(in_modes), *batch)  # -> (m, n, *batch)


def _mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """𝒯 ×_mode U: axis `mode` (size R) contracted with U (J, R)'s columns."""
    return torch.tensordot(tensor, matrix, dims=([mode], [1])).movedim(-1, mode)  # (…, R, …) -> (…, J, …)


def tucker_delta(core: Tensor, factors: Sequence[Tensor], out_modes: Sequence[int], in_modes: Sequence[int]) -> Tensor:
    """Δ = unfold(𝒢 ×_1 U_1 … ×_N U_N): (m, n), in the factors' dtype (dense, for references and merges; under
    autocast too, which would leave each mode product in its own dtype)."""
    out = core
    with autocast_off(core.device.type):
        for mode, factor in enumerate(factors):
            out = _mode_product(out, factor, mode)
    return _unfold_tensor(out, out_modes, in_modes)


def tucker_linear_reference(
    x: Tensor, core: Tensor, factors: Sequence[Tensor], out_modes: Sequence[int], in_modes: Sequence[int], *,
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
) -> Tensor:
    """Eager torch form of `tucker_linear`: y = F.linear(x, (W + Δ) in x's dtype, b), Δ and W + Δ in fp32 (fp64
    for fp64 inputs, so the reference doubles as the oracle)."""
    _check(core, factors, out_modes, in_modes)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    delta = tucker_delta(core.to(compute), [f.to(compute) for f in factors], out_modes, in_modes)
    merged = delta if weight is None else weight.to(compute) + delta
    return F.linear(x, merged.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _outer_and_last(core: Tensor, factors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """P as (J', R_N) (a transposed view of `outer_chain`'s) and U_N (J_N, R_N), fp32 (fp64 stays), differentiable."""
    factors = [widened(f) for f in factors]
    return outer_chain(widened(core), factors)[0].T, factors[-1]


def kronecker_factors(core: Tensor, factors: Sequence[Tensor], out_modes: Sequence[int], in_modes: Sequence[int]
                      ) -> tuple[Tensor, Tensor]:
    """Δ = Σ_r A_r ⊗ B_r split at the last mode: A (R_N, m', n') (`init.tucker.outer_as_kronecker`) and
    B_r = reshape(U_N[:, r], (m_N, n_N)) (R_N, m_N, n_N), fp32 (fp64 stays fp64), differentiable."""
    outer, last = _outer_and_last(core, factors)  # (J', R_N), (J_N, R_N)
    return outer_as_kronecker(outer.T, out_modes, in_modes), last_as_kronecker(last, out_modes, in_modes)


def tucker_prefers_factored(tokens: int, core_shape: Sequence[int], out_modes: Sequence[int],
                            in_modes: Sequence[int], has_weight: bool, training: bool) -> bool:
    """True when the Kronecker contraction needs fewer MACs than materializing W + Δ (spec §1.6 break-even).

    Factored: K = R_N·min(n'n_N m_N + m'n'm_N, m'n'n_N + m'n_N m_N) MACs per token, ×4 in training (forward, dx,
    dA, dB). Materialized: the build m·n·R_N (×2 in training: rebuilt in backward) plus, per token, m·n for the GEMM
    on Δ when there is no base weight to merge into, and m·n for dΔ = dYᵀx in training.
    """
    m_n, n_n, rank = out_modes[-1], in_modes[-1], core_shape[-1]
    m_o, n_o = math.prod(out_modes[:-1]), math.prod(in_modes[:-1])
    m, n = m_o * m_n, n_o * n_n
    kron = rank * kronecker_apply_macs(m_o, n_o, m_n, n_n)
    factored = tokens * kron * (4 if training else 1)
    per_token = (0 if has_weight else m * n) * (3 if training else 1) + (m * n if training else 0)
    materialized = m * n * rank * (2 if training else 1) + tokens * per_token
    return factored < materialized


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import INTERPRET_BLOCK, mma

    @triton.jit
    def _build_kernel(
        p_ptr, u_ptr, outer_ptr, w0_ptr, out_ptr, J_OUTER, J_LAST, R, N_LAST, N_COLS,
        HAS_W0: tl.constexpr, BO: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """W'[…] = W[…] + Σ_r P[j', r] U_N[j_N, r] at flat offset outer[j'] + (j_N // n_N)·n + j_N % n_N of the
        contiguous (m, n) matrices, for one (BO, BJ) tile of F = P U_Nᵀ."""
        ro = tl.program_id(0) * BO + tl.arange(0, BO)
        rj = tl.program_id(1) * BJ + tl.arange(0, BJ)
        mask_o = ro < J_OUTER
        mask_j = rj < J_LAST
        acc = tl.zeros((BO, BJ), dtype=tl.float32)
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            p = tl.load(p_ptr + ro[:, None] * R + rr[None, :], mask=mask_o[:, None] & (rr[None, :] < R), other=0.0)
            u = tl.load(u_ptr + rr[:, None] + rj[None, :] * R, mask=(rr[:, None] < R) & mask_j[None, :], other=0.0)
            acc = mma(p, u, acc, UPCAST, "ieee")  # F tile = P Uᵀ: (BO, BJ)
        inner = (rj // N_LAST) * N_COLS + rj % N_LAST  # (a_N, b_N) -> a_N·n + b_N
        offsets = tl.load(outer_ptr + ro, mask=mask_o, other=0)[:, None] + inner[None, :]
        mask = mask_o[:, None] & mask_j[None, :]
        if HAS_W0:
            acc += tl.load(w0_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@lru_cache(maxsize=64)
def _offsets_cpu(out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> Tensor:
    """For each outer index j' = (j_1..j_{N−1}): the flat offset a'·m_N·n + b'·n_N where its (m_N, n_N) block of
    the contiguous (m, n) matrix starts (int32: callers check m·n < 2^31)."""
    outer_out, outer_in = out_modes[:-1], in_modes[:-1]
    sizes = [m * n for m, n in zip(outer_out, outer_in)]
    j = torch.arange(math.prod(sizes), dtype=torch.int64)
    a_outer = torch.zeros_like(j)
    b_outer = torch.zeros_like(j)
    rest = j
    digits = []
    for size in reversed(sizes):  # mixed-radix digits j_k of j', last mode fastest
        digits.append(rest % size)
        rest = rest // size
    for digit, m, n in zip(reversed(digits), outer_out, outer_in):
        a_outer = a_outer * m + digit // n  # a' = row-major (a_1..a_{N−1})
        b_outer = b_outer * n + digit % n
    return (a_outer * out_modes[-1] * math.prod(in_modes) + b_outer * in_modes[-1]).to(torch.int32)


def _build_merged(P: Tensor, U: Tensor, weight: Optional[Tensor], out_modes: tuple[int, ...],
                  in_modes: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """W + Δ (or Δ) in `dtype`, written tile by tile by `_build_kernel`."""
    m, n = math.prod(out_modes), math.prod(in_modes)
    if m * n >= 2**31:
        raise ValueError(f"tucker_linear: a {m}×{n} weight has ≥ 2^31 entries; use mode='factored' for it.")
    outer = _offsets_cpu(out_modes, in_modes).to(P.device)
    out = torch.empty(m, n, device=P.device, dtype=dtype)
    j_outer, j_last, rank = P.shape[0], U.shape[0], U.shape[1]
    if interpreting():
        bo = bj = br = INTERPRET_BLOCK
    else:
        bo, bj, br = GPU_BUILD_BLOCK_OUTER, min(max(next_power_of_2(j_last), 16), GPU_BUILD_BLOCK_LAST), 16
    grid = (triton.cdiv(j_outer, bo), triton.cdiv(j_last, bj))
    w0 = weight.contiguous() if weight is not None else out
    _build_kernel[grid](P.contiguous(), U.contiguous(), outer, w0, out, j_outer, j_last, rank, in_modes[-1], n,
                        HAS_W0=weight is not None, BO=bo, BJ=bj, BR=br, UPCAST=interpreting(),
                        num_warps=GPU_BUILD_WARPS)
    return out


class TuckerMaterializedFunction(torch.autograd.Function):
    """y = x (W + Δ(P, U_N))ᵀ + b on 2-D x; W + Δ built tile by tile in forward and again in backward, never saved."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], P: Tensor, U: Tensor,
        out_modes: tuple[int, ...], in_modes: tuple[int, ...],
    ) -> Tensor:
        merged = _build_merged(P, U, weight, out_modes, in_modes, x.dtype)
        y = F.linear(x, merged, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, weight, P, U)
        ctx.modes, ctx.has_bias = (out_modes, in_modes), bias is not None
        return y

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, weight, P, U = ctx.saved_tensors
        out_modes, in_modes = ctx.modes
        need_x, need_w, need_b, need_p, need_u, _, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_p = grad_u = None
        if need_x:
            merged = _build_merged(P, U, weight, out_modes, in_modes, x.dtype)  # rebuilt, not saved
            grad_x = grad_y @ merged  # (T, m) @ (m, n) -> (T, n)
            del merged
        if need_w or need_p or need_u:
            grad_delta = matmul_fp32_out(grad_y.T, x)  # dΔ = dW' = dYᵀ x: (m, T) @ (T, n) -> (m, n), fp32
            if need_w:
                grad_w = grad_delta.to(weight.dtype)
            if need_p or need_u:
                folded = _fold_matrix(grad_delta, out_modes, in_modes)  # (m, n) -> (J_1..J_N)
                folded = folded.reshape(P.shape[0], U.shape[0])  # (J_1..J_N) -> (J', J_N)
                grad_p = folded @ U if need_p else None  # (J', J_N) @ (J_N, R) -> (J', R)
                grad_u = folded.T @ P if need_u else None  # (J_N, J') @ (J', R) -> (J_N, R)
        if need_b and ctx.has_bias:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b, grad_p, grad_u, None, None


def tucker_linear(
    x: Tensor, core: Tensor, factors: Sequence[Tensor], out_modes: Sequence[int], in_modes: Sequence[int], *,
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, base_out: Optional[Tensor] = None,
    mode: TuckerMode = "auto", backend: Optional[BackendChoice] = None,
) -> Tensor:
    """y = x (W + unfold(𝒢 ×_k U_k))ᵀ + b, or base_out + x unfold(𝒢 ×_k U_k)ᵀ (module docstring).

    Args:
        x: (..., n), n = ∏ in_modes.
        core: 𝒢 (R_1..R_N); factors: U_k (m_k·n_k, R_k); fp32 trainables or buffers (gradients flow to all).
        out_modes, in_modes: (m_1..m_N), (n_1..n_N) with products d_out and d_in.
        weight: frozen base weight (d_out, d_in), merged on the fly; None for the adapter term alone.
        bias: (d_out,).
        base_out: (..., d_out) output of a base layer that has no plain weight to merge (e.g. a quantized one), added
            to the adapter term; only with weight and bias None.
        mode: "materialized", "factored", or "auto" (`tucker_prefers_factored` for this batch).
        backend: "triton" / "torch" / "auto" override (see `kernel_backend`).

    Returns:
        (..., d_out) in x's dtype.
    """
    _check(core, factors, out_modes, in_modes)
    out_modes, in_modes = tuple(int(v) for v in out_modes), tuple(int(v) for v in in_modes)
    d_out, d_in = math.prod(out_modes), math.prod(in_modes)
    if weight is not None and tuple(weight.shape) != (d_out, d_in):
        raise ValueError(f"tucker_linear: weight {tuple(weight.shape)} must be ({d_out}, {d_in}).")
    check_bias(bias, d_out, "tucker_linear")
    if mode not in ("auto", "materialized", "factored"):
        raise ValueError(f"tucker_linear: mode={mode!r}; use 'auto', 'materialized' or 'factored'.")
    if base_out is not None and (weight is not None or bias is not None):
        raise ValueError("tucker_linear: pass the base either as weight/bias (merged) or as base_out, not both.")
    rows = as_rows(x, d_in, "tucker_linear x")  # (..., n) -> (T, n)
    base_rows = as_base_rows(base_out, rows, d_out, "tucker_linear base_out")  # (..., d_out) -> (T, d_out)
    if mode == "auto":
        training = torch.is_grad_enabled() and (core.requires_grad or any(f.requires_grad for f in factors))
        factored = tucker_prefers_factored(rows.shape[0], core.shape, out_modes, in_modes, weight is not None,
                                           training)
        mode = "factored" if factored else "materialized"
    if mode == "factored":
        A, B = kronecker_factors(core, factors, out_modes, in_modes)
        b = None if bias is None else bias.to(x.dtype)
        base = base_rows
        if weight is not None:
            base = F.linear(rows, weight.to(x.dtype), b)  # the frozen base GEMM; the kernel adds the Kronecker terms
        elif b is not None:
            base = b.expand(rows.shape[0], d_out)  # (d_out,) -> (T, d_out), a stride-0 view
        y = kronecker_linear(rows, A, B, base_out=base, backend=backend)
    else:
        if kernel_backend(x, core, weight, backend=backend) == "torch":
            y = tucker_linear_reference(rows, core, factors, out_modes, in_modes, weight=weight, bias=bias)
        else:  # under autocast: x cast once, W + Δ built in its dtype, (P, U_N) in the factors' fp32
            dtype = autocast_dtype(rows)
            with autocast_off(rows.device.type):
                P, U = _outer_and_last(core, factors)
                y = TuckerMaterializedFunction.apply(as_dtype(rows, dtype), weight, bias, P, U, out_modes, in_modes)
        if base_rows is not None:
            y = y + base_rows
    return y.reshape(*x.shape[:-1], d_out)  # (T, d_out) -> (..., d_out)
