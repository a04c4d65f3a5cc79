"""FedSVD re-factorization of a LoRA product B·A (arXiv 2505.12805; spec §2.3, anchors/performance.md §3.6).

Given B (m×r) and A (r×n), return (A', B') with

    B' A' = B A   (exactly, since rank(BA) ≤ r),   A' A'ᵀ = I_r,   B' = U_r Σ_r,   A' = V_rᵀ,

i.e. A' holds the top-r right singular vectors of BA. The QR route never forms the m×n product:

    B = Q_B R_B,   Aᵀ = Q_A R_A,   C = R_B R_Aᵀ (r×r) = U_c S V_cᵀ,   A' = V_cᵀ Q_Aᵀ,   B' = Q_B U_c S,

which costs O((m+n) r² + r³) instead of the O(m n min(m, n)) of a dense SVD (kept as `refactorize_dense`, the
reference). Both run in fp32 (fp64 when given fp64) and return the input dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["RefactorMethod", "refactorize", "refactorize_dense", "refactorize_qr"]

RefactorMethod = Literal["qr", "dense"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # No bf16/fp16 QR or SVD kernels exist, and fp16 SVD is unstable (spec §2.13 item 7): up-cast to fp32 at least.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_factors(A: Tensor, B: Tensor, where: str) -> tuple[int, int, int]:
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"{where}: A and B must be matrices, got A {tuple(A.shape)} and B {tuple(B.shape)}.")
    r, n = A.shape
    m, r_b = B.shape
    if r_b != r:
        raise ValueError(f"{where}: B is {m}×{r_b} but A is {r}×{n}; B's columns must equal A's rows (the rank r).")
    if r > n:
        raise ValueError(
            f"{where}: rank r={r} exceeds A's width n={n}; A cannot have r orthonormal rows. Lower the LoRA rank."
        )
    return m, r, n


def refactorize_qr(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Re-factorize B·A through QRs of the thin factors and an SVD of the r×r core (never forms B·A).

    Args:
        A: (r, n) frozen LoRA factor (any rank, including 0).
        B: (m, r) trained LoRA factor (may be rank-deficient or zero).

    Returns:
        (A', B'): A' (r, n) with orthonormal rows, B' (m, r) = U_r diag(σ) padded with zero columns when m < r,
        with B' A' = B A up to rounding; singular values in descending order.
    """
    m, r, n = _check_factors(A, B, "refactorize_qr")
    dtype = _compute_dtype(A, B)
    q_b, r_b = torch.linalg.qr(B.to(dtype))  # (m, k_b), (k_b, r) with k_b = min(m, r)
    q_a, r_a = torch.linalg.qr(A.to(dtype).T)  # (n, r), (r, r): Q_A has orthonormal columns even if A is singular
    core = r_b @ r_a.T  # (k_b, r) · (r, r) -> (k_b, r)
    # full_matrices: V_c must be r×r so A' keeps r orthonormal rows even when k_b = m < r.
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=True)  # (k_b, k_b), (min(k_b, r),), (r, r)
    a_new = vh_c @ q_a.T  # (r, r) · (r, n) -> (r, n)
    k = s.numel()
    b_new = torch.zeros(m, r, dtype=dtype, device=B.device)
    b_new[:, :k] = (q_b @ u_c[:, :k]) * s  # (m, k_b) · (k_b, k) -> (m, k), columns scaled by σ
    return a_new.to(A.dtype), b_new.to(B.dtype)


def refactorize_dense(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Reference route of the official code (`reinit_lora`): SVD of the dense m×n product B·A.

    Same contract as `refactorize_qr`; costs O(m n min(m, n)) time and m×n memory.
    """
    m, r, n = _check_factors(A, B, "refactorize_dense")
    dtype = _compute_dtype(A, B)
    product = B.to(dtype) @ A.to(dtype)  # (m, r) · (r, n) -> (m, n)
    # When min(m, n) < r the thin SVD has fewer than r right vectors; the full one completes the basis.
    u, s, vh = torch.linalg.svd(product, full_matrices=min(m, n) < r)
    a_new = vh[:r]  # (r, n)
    k = min(s.numel(), r)
    b_new = torch.zeros(m, r, dtype=dtype, device=B.device)
    b_new[:, :k] = u[:, :k] * s[:k]  # (m, k) columns scaled by σ
    return a_new.to(A.dtype), b_new.to(B.dtype)


def refactorize(A: Tensor, B: Tensor, method: RefactorMethod = "qr") -> tuple[Tensor, Tensor]:
    """Re-factorize B·A into (A' with orthonormal rows, B' = U_r Σ_r) by the QR route (default) or a dense SVD."""
    if method == "qr":
        return refactorize_qr(A, B)
    if method == "dense":
        return refactorize_dense(A, B)
    raise ValueError(f"refactorize: method={method!r} is not one of 'qr' (fast, default) or 'dense' (reference).")
