"""Cost model of the Tucker network's contractions (spec tera_fedsvd_snella.md §1.6): MACs and memory traffic of
building Δ and of applying it to tokens without forming it, per plan, so callers can pick the cheapest.

Pure integer arithmetic on a `TuckerShape` (init/tucker.py, which runs the plans this module prices) or on the
factor sizes of a Kronecker product.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from .kronecker import divisors

if TYPE_CHECKING:
    from .tucker import TuckerShape

__all__ = [
    "apply_macs", "apply_traffic", "best_mode", "build_macs", "edge_kronecker_cost", "is_kronecker",
    "kronecker_apply_macs", "kronecker_grads_cost", "kronecker_splits", "last_mode_build_macs",
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


def kronecker_apply_macs(m1: int, n1: int, m2: int, n2: int) -> int:
    """MACs per token of x (A ⊗ B)ᵀ with A (m1×n1), B (m2×n2) as two GEMM-shaped contractions, in the cheaper order:
    B first (n1·n2·m2 + m1·n1·m2) or A first (m1·n1·n2 + m1·n2·m2)."""
    return min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2)


def kronecker_grads_cost(m1: int, n1: int, m2: int, n2: int, transposed: bool) -> tuple[int, int]:
    """(MACs, elements moved) per token of the factor gradients dA, dB of x (A ⊗ B)ᵀ, A (m1×n1), B (m2×n2), as
    `kernels.kronecker_factor_grads` runs them: D = AᵀG and Z = X Bᵀ (n1·m2 each), then the two reductions
    (n1·n2·m2 + m1·n1·m2 MACs, twice); `transposed` runs the mirror problem (m1, n1) ↔ (m2, n2). Traffic: X and G
    copied side by side (2·(n + m)), D and Z written and read (4·n1·m2)."""
    if transposed:
        m1, n1, m2, n2 = m2, n2, m1, n1
    return 2 * (n1 * n2 * m2 + m1 * n1 * m2), 2 * (n1 * n2 + m1 * m2) + 4 * n1 * m2


def edge_kronecker_cost(shape: TuckerShape) -> tuple[int, int] | None:
    """(MACs, elements written) per token of x Δᵀ as x (P ⊗ M_N)ᵀ when R_N = 1 (P = 𝒢 ×_{l<N} Ũ_l, m'×n'), else None.

    `kronecker_apply_macs` of (P, M_N), as `kernels.kronecker_linear` runs it; the intermediate is n'·m_N (M_N first)
    or m'·n_N (P first); traffic counted as in `apply_traffic`: 3·z + 3·m + n.
    """
    if shape.ranks[-1] != 1:
        return None
    m, n, m_w, n_w = shape.out_features, shape.in_features, shape.out_modes[-1], shape.in_modes[-1]
    m_p, n_p = m // m_w, n // n_w
    macs = kronecker_apply_macs(m_p, n_p, m_w, n_w)
    m_first = n_p * n_w * m_w + m_p * n_p * m_w
    z = n_p * m_w if macs == m_first else m_p * n_w
    return macs, 3 * z + 3 * m + n


@functools.lru_cache(maxsize=None)
def kronecker_splits(d_out: int, d_in: int) -> tuple[tuple[int, int, int], ...]:
    """(per-token MACs, m_w, n_w) of every split Δ = P ⊗ M (M: m_w×n_w, P: (d_out/m_w)×(d_in/n_w)) that keeps Δ full
    rank, cheapest first (ties: larger M first).

    The cost is `kronecker_apply_macs`, minimal near m_w ≈ √m, n_w ≈ √n: 2·n^1.5 at m = n, 3 % of the m·n GEMM at
    4096². Full rank needs min(m_w, n_w)·min(m/m_w, n/n_w) = min(m, n); both factors must be non-trivial (primes
    have no split).
    """
    splits = []
    for m_w in divisors(d_out):
        for n_w in divisors(d_in):
            if m_w * n_w in (1, d_out * d_in) or min(m_w, n_w) * min(d_out // m_w, d_in // n_w) != min(d_out, d_in):
                continue
            splits.append((kronecker_apply_macs(d_out // m_w, d_in // n_w, m_w, n_w), m_w, n_w))
    return tuple(sorted(splits, key=lambda split: (split[0], -split[1] * split[2])))
