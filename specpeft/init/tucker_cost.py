"""Cost model of the Tucker network's contractions (spec tera_fedsvd_snella.md §1.6): MACs and memory traffic of
building Δ and of applying it to tokens without forming it, per plan, so callers can pick the cheapest.

Pure integer arithmetic on a `TuckerShape` (init/tucker.py, which runs the plans this module prices).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tucker import TuckerShape

__all__ = [
    "apply_macs", "apply_traffic", "best_mode", "build_macs", "edge_kronecker_cost", "is_kronecker", "kronecker_splits",
    "last_mode_build_macs",
]


def build_macs(shape: TuckerShape) -> int:
    """MACs of `tucker_to_tensor` in mode order (spec §1.6)."""
    sizes, ranks = shape.mode_sizes, shape.ranks
    return sum(math.prod(sizes[: k + 1]) * math.prod(ranks[k:]) for k in range(shape.order))


def is_kronecker(shape: TuckerShape) -> bool:
    """At most one R_k > 1: then Δ = M_1 ⊗ … ⊗ M̄_k ⊗ … ⊗ M_N is one Kronecker product (M̄_k = Σ_r 𝒢[r]·M_k^{(r)})."""
    return sum(rank > 1 for rank in shape.ranks) <= 1


def apply_macs(shape: TuckerShape, mode: int | None = None, unmerged: bool = False) -> tuple[int, int]:
    """(pre, per-token) MACs of `tucker_apply` (the Kronecker chain when `is_kronecker` and not `unmerged`, else
    with `mode` unmerged).

    Kronecker chain: Σ_k (∏_{l≤k} n_l)(∏_{l≥k} m_l) per token. Unmerged mode k: pre = P = 𝒢 ×_{l≠k} U_l;
    per token n·m_k·R_k (x against U_k) + (n/n_k)·R_k·m (against P).
    """
    m_modes, n_modes = shape.out_modes, shape.in_modes
    if is_kronecker(shape) and not unmerged:
        per_token = sum(math.prod(n_modes[: k + 1]) * math.prod(m_modes[k:]) for k in range(shape.order))
        return sum(j * r for j, r in zip(shape.mode_sizes, shape.ranks)), per_token
    k = best_mode(shape, unmerged) if mode is None else mode
    sizes, ranks = shape.mode_sizes, shape.ranks
    pre, current = 0, list(ranks)
    for l in (l for l in range(shape.order) if l != k):  # mode products in order; each replaces R_l by J_l
        pre += math.prod(current) * sizes[l]
        current[l] = sizes[l]
    n, m = shape.in_features, shape.out_features
    return pre, n * m_modes[k] * ranks[k] + (n // n_modes[k]) * ranks[k] * m


def apply_traffic(shape: TuckerShape, mode: int | None = None, unmerged: bool = False) -> int:
    """Elements written per token by `tucker_apply`'s forward (GEMM outputs plus layout copies).

    Kronecker chain: 2·Σ_k (∏_{l<k} n_l)(∏_{l≥k} m_l). Unmerged mode k: 3·z + 3·m + n with z = n·m_k·R_k/n_k
    (Z written, permuted, read; the output likewise; the input reshaped).
    """
    m_modes, n_modes = shape.out_modes, shape.in_modes
    if is_kronecker(shape) and not unmerged:
        return 2 * sum(math.prod(n_modes[:k]) * math.prod(m_modes[k:]) for k in range(shape.order))
    k = best_mode(shape, unmerged) if mode is None else mode
    z = shape.in_features // n_modes[k] * m_modes[k] * shape.ranks[k]
    return 3 * z + 3 * shape.out_features + shape.in_features


def best_mode(shape: TuckerShape, unmerged: bool = False) -> int:
    """The mode to leave unmerged in `tucker_apply` that minimizes its per-token MACs (first on ties); `unmerged`:
    among unmerged-mode plans even for a Kronecker shape (the projected gradients of adapters/tera.py)."""
    kron = is_kronecker(shape) and not unmerged
    return min(range(shape.order), key=lambda k: (apply_macs(shape, k, unmerged)[1] if not kron else 0, k))


def last_mode_build_macs(shape: TuckerShape) -> int:
    """MACs of `last_mode_outer` + `last_mode_delta_rows`."""
    sizes, ranks = shape.mode_sizes, shape.ranks
    outer = sum(math.prod(sizes[: k + 1]) * math.prod(ranks[k:]) for k in range(shape.order - 1))
    return outer + shape.out_features * shape.in_features * ranks[-1]


def edge_kronecker_cost(shape: TuckerShape) -> tuple[int, int] | None:
    """(MACs, elements written) per token of x Δᵀ as x (P ⊗ M_N)ᵀ when R_N = 1 (P = 𝒢 ×_{l<N} Ũ_l, m'×n'), else None.

    Two GEMM-shaped contractions per token, M_N first (n·m_N + m·n/n_N, intermediate n'·m_N) or P first
    (m·n/m_N + m·n_N, intermediate m'·n_N), whichever is cheaper (`kernels.kronecker_linear`); traffic counted as in
    `apply_traffic`: 3·z + 3·m + n.
    """
    if shape.ranks[-1] != 1:
        return None
    m, n, m_w, n_w = shape.out_features, shape.in_features, shape.out_modes[-1], shape.in_modes[-1]
    m_first = (n * m_w + m * n // n_w, n // n_w * m_w)
    p_first = (m * n // m_w + m * n_w, m // m_w * n_w)
    macs, z = min(m_first, p_first)
    return macs, 3 * z + 3 * m + n


def kronecker_splits(d_out: int, d_in: int) -> list[tuple[int, int, int]]:
    """(per-token MACs, m_w, n_w) of every split Δ = P ⊗ M (M: m_w×n_w, P: (d_out/m_w)×(d_in/n_w)) that keeps Δ full
    rank, cheapest first (ties: larger M first).

    Applying P ⊗ M costs min(n·m_w + m·n/n_w, m·n/m_w + m·n_w) MACs per token (M first or P first), minimal near
    m_w ≈ √m, n_w ≈ √n: 2·n^1.5 at m = n, 3 % of the m·n GEMM at 4096². Full rank needs
    min(m_w, n_w)·min(m/m_w, n/n_w) = min(m, n); both factors must be non-trivial (primes have no split).
    """
    splits = []
    for m_w in (d for d in range(1, d_out + 1) if d_out % d == 0):
        for n_w in (d for d in range(1, d_in + 1) if d_in % d == 0):
            if m_w * n_w in (1, d_out * d_in) or min(m_w, n_w) * min(d_out // m_w, d_in // n_w) != min(d_out, d_in):
                continue
            cost = min(d_in * m_w + d_out * d_in // n_w, d_out * d_in // m_w + d_out * n_w)
            splits.append((cost, m_w, n_w))
    return sorted(splits, key=lambda split: (split[0], -split[1] * split[2]))
