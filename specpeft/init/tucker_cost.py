"""Cost model of the Tucker network's contractions (spec tera_fedsvd_snella.md §1.6): MACs and memory traffic of
building Δ and of applying it to tokens without forming it, per plan, so callers can pick the cheapest.

Pure integer arithmetic on a `TuckerShape` (init/tucker.py, which runs the plans this module prices).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tucker import TuckerShape

__all__ = ["apply_macs", "apply_traffic", "best_mode", "build_macs", "is_kronecker", "last_mode_build_macs"]


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
