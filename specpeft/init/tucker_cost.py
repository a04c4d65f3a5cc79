"""Cost model of the Tucker network's contractions (spec tera_fedsvd_snella.md §1.6): MACs and memory traffic of
building Δ and of applying it to tokens without forming it, per plan, so callers can pick the cheapest.

Integer arithmetic on a `TuckerShape` (init/tucker.py, which runs the plans this module prices) or on the factor
sizes of a Kronecker product, and TeRA's training-step model on top (`training_step_costs`), which weighs memory
passes and slow contractions by three constants calibrated on the 2-core dev box (plus one token count measured on an
H100, `CUDA_FACTORED_TOKENS`).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Sequence

from .kronecker import divisors

if TYPE_CHECKING:
    from .tucker import TuckerShape

__all__ = [
    "KRONECKER_APPLY_PENALTY", "MEMORY_MACS", "PROJECTED_PENALTY", "apply_macs", "apply_traffic", "best_mode",
    "build_macs", "edge_kronecker_cost", "is_kronecker", "kronecker_apply_macs", "kronecker_grads_cost",
    "kronecker_splits", "last_mode_build_macs", "last_mode_split", "training_step_costs",
]

# One element pass of a memory-bound op (copy, add, permute) costs about this many GEMM MACs: measured 25-85 on the
# 2-core dev box (fp32 GEMM 10-25 GMAC/s vs 0.1-1 G elements/s); 40 picks the faster path in every case of
# benchmarks/results/tera_speed.md.
MEMORY_MACS = 40
# The projected contractions (einsums over small mode sizes, with layout copies of T-sized intermediates) ran
# 1.5-2.5x slower per estimated MAC than the dense path's large GEMM on the 2-core dev box (4096² R=4, 384×1536
# R=1, 1024² R=1 in benchmarks/results/tera_speed.md); their estimate is scaled by this before comparing.
PROJECTED_PENALTY = 2.5
# In chains of adapted layers under one backward, as in a model, the default layout's merged path overtook the
# factored one (Δ = P ⊗ M_N by the CPU Kronecker op: GEMMs with 6-64 wide inner dimensions and permuting copies) at
# far fewer tokens than the unscaled estimate says: about 100-250 at MiniLM's shapes and ~300 at 1024², where it
# put 221-680 and 550; at 4096² the two tie at 1,024 (benchmarks/tera_switch.py, results/tera_switch.md). The factored
# estimate is scaled by this before comparing. One constant is a compromise: the switch points fit 1.3-1.5 at
# 1536×384, 1024² and 4096², 1.45-2.5 at 384² and ~3 at MiniLM's 384×1536, which 1.4 leaves factored up to 377 tokens,
# where the chains favour merged by 3-5 % from ~130; and it keeps 4096² factored at 1,024, where the single-layer rows
# of tera_speed.md measured factored faster.
KRONECKER_APPLY_PENALTY = 1.4
# The model above is CPU-calibrated. On an H100 (bf16, benchmarks/results/tera_gpu.md) the default layout's factored
# path (Δ = P ⊗ M_N applied to x) trained within noise of the merged one or up to 1.25x faster at 4096-wide layers
# from T = 4096, and 1.3-1.5x faster at T = 16384, where the merged path's two fp32 m×n weight builds and fp32
# factor-gradient GEMMs dominate; at T = 1024 both are bound by host time and the merged path, with fewer ops, was
# 10-20 % faster (a 1024² layer, host-bound at every T, stayed 1.1-1.27x faster merged at T >= 4096: one threshold
# for all widths). TeRA therefore runs that layout on a plain CUDA linear factored from this many tokens per call.
# Those runs used the einsum torch path; with `kernels.kronecker_torch.kronecker_linear_bmm` (41-43 aten ops a step
# then, 36-38 now, instead of 78) both paths ran about 100 ops per layer, and an in-process A/B on a 4-layer Llama at
# T = 512-4096 per call stayed within the host's ±10 % noise, so the threshold stands.
CUDA_FACTORED_TOKENS = 4096


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


def kronecker_a_first(m1: int, n1: int, m2: int, n2: int) -> bool:
    """Whether `kronecker_apply_macs`'s cheaper order applies A first (Y_t = (A X_t) Bᵀ); ties go to B first. The order
    of `kernels.kronecker_linear` (its Triton kernel, einsum reference and batched-GEMM torch op)."""
    return m1 * n1 * n2 + m1 * n2 * m2 < n1 * n2 * m2 + m1 * n1 * m2


def last_mode_split(out_modes: Sequence[int], in_modes: Sequence[int]) -> tuple[int, int, int, int]:
    """(m', n', m_N, n_N): the factor sizes of Δ = Σ_r P_r ⊗ M_N^{(r)} split at the last mode (P over modes < N)."""
    return math.prod(out_modes[:-1]), math.prod(in_modes[:-1]), out_modes[-1], in_modes[-1]


@functools.lru_cache(maxsize=None)
def kronecker_grads_cost(m1: int, n1: int, m2: int, n2: int) -> tuple[int, int, bool]:
    """(MACs, elements moved, adjoint) per token of the factor gradients dA, dB of x (A ⊗ B)ᵀ, A (m1×n1), B (m2×n2),
    as `kernels.kronecker_factor_grads` runs them: x copied and contracted with A, dY contracted with B,
    2·(m·n2 + n·m1) MACs, or (`adjoint`) the same on the adjoint problem, dY copied and x contracted with Bᵀ,
    2·(n·m2 + m·n1), whichever is fewer (ties: the smaller traffic, then copying the narrower side). Traffic, the
    count `MEMORY_MACS` was calibrated with: x and dY (2·(n + m)) and the two intermediates written and read
    (4·m1·n2, adjoint 4·n1·m2)."""
    m, n = m1 * m2, n1 * n2
    direct = 2 * (m * n2 + n * m1), 2 * (n + m) + 4 * m1 * n2
    adjoint = 2 * (n * m2 + m * n1), 2 * (n + m) + 4 * n1 * m2
    return (*adjoint, True) if (*adjoint, m) < (*direct, n) else (*direct, False)


def edge_kronecker_cost(shape: TuckerShape) -> tuple[int, int] | None:
    """(MACs, elements written) per token of x Δᵀ as x (P ⊗ M_N)ᵀ when R_N = 1 (P = 𝒢 ×_{l<N} Ũ_l, m'×n'), else None.

    `kronecker_apply_macs` of (P, M_N), as `kernels.kronecker_linear` runs it; the intermediate is n'·m_N (M_N first)
    or m'·n_N (P first); traffic counted as in `apply_traffic`: 3·z + 3·m + n.
    """
    if shape.ranks[-1] != 1:
        return None
    m, n = shape.out_features, shape.in_features
    m_p, n_p, m_w, n_w = last_mode_split(shape.out_modes, shape.in_modes)
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


def training_step_costs(shape: TuckerShape, tokens: int, unmerged_mode: int, projected_mode: int, edge: bool,
                        kronecker: bool) -> dict[str, float]:
    """Training-step cost of each TeRA path (adapters/tera.py) beyond the frozen base op, in GEMM-MAC equivalents.

    Every element pass of a memory-bound op counts `MEMORY_MACS` MACs. "factored": forward + backward of the
    contraction (`unmerged_mode`'s plan, or P ⊗ M_N when `edge`, then scaled by `KRONECKER_APPLY_PENALTY`),
    3·(pre + T·c) MACs + 3·T·traffic. The merged-weight paths build W₀ + Δ twice (forward, backward) and add the vector
    gradients: "dense" (2·build MACs + 8 passes over m·n) dΔ = dYᵀX (T·m·n) and its contraction (2·m·n·R_N MACs, 3
    passes, the smaller of dY and dΔ permuted: min(T, n)·m); "projected" (same build) `PROJECTED_PENALTY`·(2·T·c MACs
    + 2·T·traffic) of the `projected_mode` contraction; "kronecker" (only when `kronecker`: R_N = 1 on a plain linear;
    same build price: its fused multiply-add makes 2 passes, but a fresh m·n buffer's page faults cost about as much
    again, measured 1.45× base merged vs 1.07-1.13× factored at 4096², T = 1024) `kronecker_grads_cost` per token.
    """
    pre, per_token = apply_macs(shape, unmerged_mode)
    traffic = apply_traffic(shape, unmerged_mode)
    if edge:  # P = 𝒢 ×_{l<N} Ũ_l, then P ⊗ M_N applied in the cheaper order
        pre = apply_macs(shape, shape.order - 1)[0]
        per_token, traffic = edge_kronecker_cost(shape)
    dense = shape.out_features * shape.in_features
    merge = 2 * last_mode_build_macs(shape) + 8 * MEMORY_MACS * dense
    grads_dense = tokens * dense + 2 * dense * shape.ranks[-1] + MEMORY_MACS * (
        3 * dense + min(tokens, shape.in_features) * shape.out_features)
    projected_per_token = 2 * apply_macs(shape, projected_mode, unmerged=True)[1]
    grads_projected = PROJECTED_PENALTY * tokens * (
        projected_per_token + 2 * MEMORY_MACS * apply_traffic(shape, projected_mode, True))
    factored = 3 * (pre + tokens * per_token) + 3 * MEMORY_MACS * tokens * traffic
    costs = {"factored": KRONECKER_APPLY_PENALTY * factored if edge else factored,
             "dense": merge + grads_dense, "projected": merge + grads_projected}
    if kronecker:
        macs, moved, _ = kronecker_grads_cost(*last_mode_split(shape.out_modes, shape.in_modes))
        costs["kronecker"] = merge + tokens * (macs + MEMORY_MACS * moved)
    return costs
