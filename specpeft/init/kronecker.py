"""Kronecker algebra for SoKA: Van Loan–Pitsianis rearrangement, KPSVD, factor shapes, rank rules, fast product.

Row-major convention, the one `torch.kron` uses: for A (m1×n1) and B (m2×n2),

    (A⊗B)[i·m2 + k, j·n2 + l] = A[i, j] · B[k, l].

The rearrangement R: (m1m2 × n1n2) → (m1n1 × m2n2) is a permutation of entries with R(A⊗B) = vec(A) vec(B)ᵀ, so

    ‖W − Σ_k A_k⊗B_k‖_F = ‖R(W) − Σ_k vec(A_k) vec(B_k)ᵀ‖_F,

and the truncated SVD R(W) ≈ Σ_{k≤r} σ_k u_k v_kᵀ gives the best sum of r Kronecker products (Van Loan & Pitsianis,
1993) with error sqrt(Σ_{k>r} σ_k²). Methods spec svfit_soka_flora.md §2.2–2.6.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .svd import SVDInit, elbow_rank, energy_rank, truncated_svd

__all__ = [
    "KroneckerShape",
    "KPSVD",
    "RankRule",
    "rearrange",
    "unrearrange",
    "choose_factor_shape",
    "divisors",
    "kpsvd",
    "rank_criteria",
    "select_rank",
    "allocate_budget",
    "kron_sum",
]

RankRule = Literal["min", "max", "energy", "elbow"]


# -- rearrangement ----------------------------------------------------------------------------------------------


def rearrange(weight: Tensor, a_shape: Sequence[int], b_shape: Sequence[int]) -> Tensor:
    """R(W): (m1·m2, n1·n2) → (m1·n1, m2·n2), with R(A⊗B) = vec(A) vec(B)ᵀ (row-major vec)."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    if tuple(weight.shape) != (m1 * m2, n1 * n2):
        raise ValueError(
            f"rearrange: weight of shape {tuple(weight.shape)} does not match factors {tuple(a_shape)}⊗{tuple(b_shape)}"
            f", which need ({m1 * m2}, {n1 * n2}); pad the weight to the factors' padded shape first."
        )
    # (m1·m2, n1·n2) -> (m1, m2, n1, n2) -> (m1, n1, m2, n2) -> (m1·n1, m2·n2)
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def unrearrange(matrix: Tensor, a_shape: Sequence[int], b_shape: Sequence[int]) -> Tensor:
    """R⁻¹: (m1·n1, m2·n2) → (m1·m2, n1·n2)."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    if tuple(matrix.shape) != (m1 * n1, m2 * n2):
        raise ValueError(
            f"unrearrange: matrix of shape {tuple(matrix.shape)} does not match factors {tuple(a_shape)}⊗"
            f"{tuple(b_shape)}, which need ({m1 * n1}, {m2 * n2})."
        )
    # (m1·n1, m2·n2) -> (m1, n1, m2, n2) -> (m1, m2, n1, n2) -> (m1·m2, n1·n2)
    return matrix.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


# -- factor shapes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KroneckerShape:
    """Factor shapes of W ≈ Σ_k A_k⊗B_k, A_k (m1×n1), B_k (m2×n2), for a (d_out × d_in) matrix.

    When m1·m2 > d_out or n1·n2 > d_in the matrix is zero-padded for the KPSVD and ΔW is cropped back.

    Attributes:
        a_shape: (m1, n1).
        b_shape: (m2, n2).
        matrix_shape: (d_out, d_in), the unpadded weight viewed as a matrix.
    """

    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    matrix_shape: tuple[int, int]

    def __post_init__(self) -> None:
        (d_out, d_in), (out_p, in_p) = self.matrix_shape, self.padded_shape
        if min(*self.a_shape, *self.b_shape) < 1 or out_p < d_out or in_p < d_in:
            raise ValueError(
                f"KroneckerShape: factors {self.a_shape}⊗{self.b_shape} give a {out_p}×{in_p} matrix, which does not "
                f"cover the {d_out}×{d_in} weight; use choose_factor_shape({d_out}, {d_in})."
            )

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.a_shape[0] * self.b_shape[0], self.a_shape[1] * self.b_shape[1]

    @property
    def padding(self) -> tuple[int, int]:
        """Zero rows and columns added to W: (m1·m2 − d_out, n1·n2 − d_in)."""
        return self.padded_shape[0] - self.matrix_shape[0], self.padded_shape[1] - self.matrix_shape[1]

    @property
    def params_per_component(self) -> int:
        return self.a_shape[0] * self.a_shape[1] + self.b_shape[0] * self.b_shape[1]

    @property
    def rank_cap(self) -> int:
        """Largest matrix rank of one component: rank(A⊗B) = rank(A)·rank(B) ≤ min(m1, n1)·min(m2, n2)."""
        return min(self.a_shape) * min(self.b_shape)

    @property
    def max_components(self) -> int:
        """Number of Kronecker components KPSVD can return: min(m1·n1, m2·n2) (the rank bound of R(W))."""
        return min(self.a_shape[0] * self.a_shape[1], self.b_shape[0] * self.b_shape[1])

    def to_record(self) -> dict:
        return {"a_shape": list(self.a_shape), "b_shape": list(self.b_shape), "padding": list(self.padding)}

    @classmethod
    def from_record(cls, record: dict, matrix_shape: tuple[int, int]) -> KroneckerShape:
        a_shape, b_shape = record["a_shape"], record["b_shape"]
        return cls((int(a_shape[0]), int(a_shape[1])), (int(b_shape[0]), int(b_shape[1])), tuple(matrix_shape))


@functools.lru_cache(maxsize=None)
def divisors(n: int) -> tuple[int, ...]:
    """The divisors of n ≥ 1, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted(set(small + [n // d for d in small])))


def _best_split(rows: int, cols: int, rank_needed: int, max_params: int) -> tuple[tuple, tuple[int, ...]] | None:
    """Best (m1, n1, m2, n2) with m1·m2 = rows, n1·n2 = cols under rules (a), (d); ranked by (b), then (c)."""
    best = None
    for m1 in divisors(rows):
        m2 = rows // m1
        for n1 in divisors(cols):
            n2 = cols // n1
            if min(m1, n1) * min(m2, n2) < rank_needed:  # (a) one component can be full rank
                continue
            params = m1 * n1 + m2 * n2
            if params > max_params:  # (d) no degenerate shape costing more than a rank-2 LoRA
                continue
            # (b) fewest params, less padding, (c) balanced factors, then smaller A first for determinism
            key = (params, rows * cols, abs(m1 * n1 - m2 * n2), m1 * n1, m1)
            if best is None or key < best[0]:
                best = (key, (m1, n1, m2, n2))
    return best


# Padded sizes within this fraction of the smallest qualifying padded area compete on params (rule b).
_AREA_SLACK = 0.02


@functools.lru_cache(maxsize=256)  # pure; padded searches for prime dims take ~0.3 s
def choose_factor_shape(d_out: int, d_in: int, max_padding: float = 0.125) -> KroneckerShape:
    """Factor shapes for a (d_out × d_in) matrix by the rule of spec §2.4.

    Among divisor choices m1·m2 = d_out, n1·n2 = d_in: (a) require min(m1, n1)·min(m2, n2) ≥ min(d_out, d_in), so a
    single component may be full rank; (b) minimize params m1·n1 + m2·n2; (c) prefer m1·n1 ≈ m2·n2; (d) reject
    shapes with params > 2(d_out + d_in). If nothing qualifies (prime or near-prime dims), the matrix is zero-padded:
    padded sizes are visited by increasing area, and among those within 2 % of the smallest qualifying area the
    fewest params win, e.g. 4099×4096 → 4160×4096 = (64·65)×(64·64), 8,256 params per component.

    Args:
        d_out: rows of the weight matrix.
        d_in: columns of the weight matrix (in/groups·prod(kernel) for a conv).
        max_padding: largest padding searched per dim, as a fraction of the dim (at least 8 rows/cols).

    Raises:
        ValueError: non-positive dims, or no qualifying shape within the padding bound.
    """
    if d_out < 1 or d_in < 1:
        raise ValueError(f"choose_factor_shape: dims must be ≥ 1, got {d_out}×{d_in}.")
    rank_needed, max_params = min(d_out, d_in), 2 * (d_out + d_in)
    bound_out = d_out + max(8, int(d_out * max_padding))
    bound_in = d_in + max(8, int(d_in * max_padding))
    found = _best_split(d_out, d_in, rank_needed, max_params)
    if found is not None:  # pad only when the dims themselves have no qualifying split
        m1, n1, m2, n2 = found[1]
        return KroneckerShape((m1, n1), (m2, n2), (d_out, d_in))
    heap, seen = [(d_out * d_in, d_out, d_in)], {(d_out, d_in)}
    first_area = None
    while heap:
        area, rows, cols = heapq.heappop(heap)
        if first_area is not None and area > first_area * (1 + _AREA_SLACK):
            break
        if found is not None and 2 * math.sqrt(area) >= found[0][0]:
            break  # params ≥ 2·sqrt(m1n1·m2n2) = 2·sqrt(area): no larger area can have fewer params
        best = _best_split(rows, cols, rank_needed, max_params)
        if best is not None and (found is None or best[0] < found[0]):
            found, first_area = best, first_area or area
        for nxt in ((rows + 1, cols), (rows, cols + 1)):
            if nxt[0] <= bound_out and nxt[1] <= bound_in and nxt not in seen:
                seen.add(nxt)
                heapq.heappush(heap, (nxt[0] * nxt[1], *nxt))
    if found is None:
        raise ValueError(
            f"choose_factor_shape: no Kronecker factor shape for a {d_out}×{d_in} matrix within {max_padding:.0%} "
            "zero-padding; raise max_padding, or leave the layer out (`exclude_modules`)."
        )
    m1, n1, m2, n2 = found[1]
    return KroneckerShape((m1, n1), (m2, n2), (d_out, d_in))


# -- KPSVD ------------------------------------------------------------------------------------------------------


class KPSVD(NamedTuple):
    """W ≈ Σ_k A[k]⊗B[k] with the balanced split A_k = √σ_k U_k, B_k = √σ_k V_k.

    Attributes:
        A: (r, m1, n1).
        B: (r, m2, n2).
        sigma: (r,) singular values of R(W), descending.
        total_energy: ‖W‖_F² (= Σ of all σ², the denominator of the captured energy).
    """

    A: Tensor
    B: Tensor
    sigma: Tensor
    total_energy: float


def kpsvd(weight: Tensor, shape: KroneckerShape, rank: int, init: SVDInit = SVDInit()) -> KPSVD:
    """Best sum of `rank` Kronecker products approximating `weight` (zero-padded to `shape.padded_shape`).

    float64 input stays float64 (one full SVD, for exactness checks); any other dtype is up-cast to fp32 and goes
    through `svd.truncated_svd` with `init` (randomized with oversampling for small ranks of large matrices).

    Args:
        weight: (d_out, d_in) matrix, `shape.matrix_shape`.
        shape: the factor shapes.
        rank: number of components, 1 ≤ rank ≤ shape.max_components.
        init: SVD options for non-float64 input.

    Returns:
        KPSVD with factors in fp32 (float64 for float64 input).
    """
    if tuple(weight.shape) != shape.matrix_shape:
        raise ValueError(f"kpsvd: weight shape {tuple(weight.shape)} != the shape's matrix_shape {shape.matrix_shape}.")
    if not 1 <= rank <= shape.max_components:
        raise ValueError(
            f"kpsvd: rank={rank} must be in [1, {shape.max_components}] for factors {shape.a_shape}⊗{shape.b_shape}."
        )
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    padded = weight.detach().to(dtype)
    if shape.padding != (0, 0):
        padded = F.pad(padded, (0, shape.padding[1], 0, shape.padding[0]))  # (d_out, d_in) -> (m1·m2, n1·n2), zeros
    matrix = rearrange(padded, shape.a_shape, shape.b_shape)  # (m1·n1, m2·n2)
    if dtype == torch.float64:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].mT
    else:
        u, s, v = truncated_svd(matrix, rank, init)
    root = s.clamp_min(0).sqrt()
    A = (u * root).mT.reshape(rank, *shape.a_shape).contiguous()  # (m1·n1, r) -> (r, m1, n1)
    B = (v * root).mT.reshape(rank, *shape.b_shape).contiguous()  # (m2·n2, r) -> (r, m2, n2)
    total = float(torch.linalg.vector_norm(padded, dtype=torch.float64)) ** 2
    return KPSVD(A, B, s.contiguous(), total)


# -- rank selection ---------------------------------------------------------------------------------------------


def rank_criteria(sigma: Tensor, total_energy: float, energy_threshold: float = 0.9,
                  elbow_log: bool = False) -> tuple[int, int]:
    """(r_E, r_elbow) of spec §2.5 on the (partial) spectrum σ of R(W), descending.

    r_E = min{k : Σ_{i≤k} σ_i² ≥ τ·‖W‖_F²}, or len(σ) if the given values never reach it; r_elbow = the Kneedle elbow
    of σ (of log σ with `elbow_log`, for spectra spanning decades), the first component below the knee.
    """
    r_energy = energy_rank(sigma, energy_threshold, total_energy)
    curve = sigma
    if elbow_log:
        logs = torch.log(sigma.double().clamp_min(torch.finfo(torch.float64).tiny))
        curve = logs - logs.min()  # the elbow is shift-invariant; elbow_rank needs values ≥ 0
    return r_energy, elbow_rank(curve)


def select_rank(
    sigma: Tensor,
    total_energy: float,
    rule: RankRule = "min",
    energy_threshold: float = 0.9,
    max_rank: int | None = None,
    elbow_log: bool = False,
) -> int:
    """Number of Kronecker components to keep, from the (partial) spectrum of R(W) (spec §2.5).

    Combines r_E and r_elbow of `rank_criteria`: "min" prunes a component if either criterion calls it negligible,
    "max" only if both do, "energy"/"elbow" use one. The result is clamped to [1, max_rank].

    Args:
        sigma: leading singular values of R(W), descending.
        total_energy: ‖W‖_F².
        rule: "min", "max", "energy" or "elbow".
        energy_threshold: τ in (0, 1].
        max_rank: upper clamp (None: len(sigma)).
        elbow_log: run the elbow on log σ.
    """
    r_energy, r_elbow = rank_criteria(sigma, total_energy, energy_threshold, elbow_log)
    choices = {"min": min(r_energy, r_elbow), "max": max(r_energy, r_elbow), "energy": r_energy, "elbow": r_elbow}
    if rule not in choices:
        raise ValueError(f"select_rank: rule={rule!r} must be one of {sorted(choices)}.")
    cap = sigma.numel() if max_rank is None else min(max_rank, sigma.numel())
    return max(1, min(choices[rule], cap))


def allocate_budget(
    sigmas: Sequence[Tensor], total_energies: Sequence[float], costs: Sequence[int], budget: int
) -> list[int]:
    """Ranks under a global parameter budget: Σ_ℓ r_ℓ·cost_ℓ ≤ budget, 1 ≤ r_ℓ ≤ len(σ_ℓ).

    Every layer keeps its first component; the rest goes greedily to the component with the largest captured energy
    fraction per parameter, σ²_{ℓ,k} / (‖W_ℓ‖_F²·cost_ℓ) (decreasing in k, so taken in order). Fractions, not
    absolute σ², keep large-norm layers from taking everything.

    Args:
        sigmas: per layer, the σ of its candidate components (its rule-selected rank is len(σ_ℓ)).
        total_energies: per layer ‖W_ℓ‖_F².
        costs: per layer parameters per component.
        budget: total trainable parameters allowed.

    Raises:
        ValueError: the budget cannot give every layer one component.
    """
    floor = sum(costs)
    if budget < floor:
        raise ValueError(
            f"param_budget={budget} is below one Kronecker component per adapted layer ({floor} params for "
            f"{len(costs)} layers); raise param_budget or target fewer modules."
        )
    ranks = [1] * len(costs)
    left = budget - floor

    def gain(layer: int, k: int) -> float:
        return float(sigmas[layer][k]) ** 2 / (max(total_energies[layer], 1e-300) * costs[layer])

    heap = [(-gain(i, 1), i) for i in range(len(costs)) if len(sigmas[i]) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if costs[i] > left:
            continue  # this layer's next component does not fit; cheaper layers may still take one
        left -= costs[i]
        ranks[i] += 1
        if ranks[i] < len(sigmas[i]):
            heapq.heappush(heap, (-gain(i, ranks[i]), i))
    return ranks


# -- Kronecker products -----------------------------------------------------------------------------------------


def kron_sum(A: Tensor, B: Tensor) -> Tensor:
    """Σ_k torch.kron(A[k], B[k]): (r, m1, n1), (r, m2, n2) → (m1·m2, n1·n2). Builds the dense matrix (merge only)."""
    total = torch.kron(A[0], B[0])
    for k in range(1, A.shape[0]):
        total = total + torch.kron(A[k], B[k])
    return total
