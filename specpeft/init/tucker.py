"""Tucker tensor networks over weight matrices: tensorization into modes, default layouts, HOSVD, contractions.

A d_out×d_in matrix Δ is viewed as an order-N tensor 𝒳 whose k-th mode pairs the k-th out-factor with the k-th
in-factor (MPO-style interleaving, spec tera_fedsvd_snella.md §1.2). With m = ∏ m_k, n = ∏ n_k and row-major
multi-indices a = (a_1..a_N), b = (b_1..b_N):

    Δ[a, b] = 𝒳[j_1, …, j_N],   j_k = a_k·n_k + b_k ∈ [0, J_k),   J_k = m_k·n_k.

A Tucker network 𝒳 = 𝒢 ×_1 U_1 ×_2 … ×_N U_N (core 𝒢: R_1×…×R_N, U_k: J_k×R_k) parameterizes Δ. Equivalently
Δ = Σ_r 𝒢[r] · M_1^{(r_1)} ⊗ … ⊗ M_N^{(r_N)} with M_k^{(r)} = reshape(U_k[:, r], (m_k, n_k)), so one Kronecker term
already has rank ∏ min(m_k, n_k): rank(Δ) is not bounded by the number of parameters.

What each contraction plan costs (MACs, traffic, the cheapest unmerged mode) lives in tucker_cost.py; the seeded
shared random factors in tucker_random.py.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .svd import SVDInit, truncated_svd
from .tucker_cost import apply_macs, best_mode, is_kronecker, kronecker_splits

__all__ = [
    "TuckerShape", "balanced_factors", "cheap_mode_ranks", "fold", "hosvd", "last_as_kronecker", "last_mode_delta_rows",
    "last_mode_outer", "mode_product", "outer_as_kronecker", "outer_chain", "prime_factors", "tucker_apply",
    "tucker_to_tensor", "unfold", "unfold_view", "unmerged_core", "unmerged_indices", "wide_last_mode",
]


# -- mode sizes -------------------------------------------------------------------------------------------------


def prime_factors(value: int) -> list[int]:
    """Prime factors of `value` ≥ 1 with multiplicity, ascending (1 → [])."""
    if value < 1:
        raise ValueError(f"prime_factors: value must be ≥ 1, got {value}.")
    factors, p = [], 2
    while p * p <= value:
        while value % p == 0:
            factors.append(p)
            value //= p
        p += 1
    if value > 1:
        factors.append(value)
    return factors


def balanced_factors(dim: int, order: int) -> tuple[int, ...]:
    """`order` integers ≥ 1 with product `dim`, as equal as its prime factors allow, in descending order.

    Primes are assigned largest first to the currently smallest bin (spec §1.3): 4096 → (16, 16, 16),
    11008 = 2⁸·43 → (43, 16, 16), 3072 → (16, 16, 12), a prime p → (p, 1, 1).
    """
    if order < 1:
        raise ValueError(f"balanced_factors: order must be ≥ 1, got {order}.")
    bins = [1] * order
    for prime in sorted(prime_factors(dim), reverse=True):
        bins[bins.index(min(bins))] *= prime
    return tuple(sorted(bins, reverse=True))


@dataclass(frozen=True)
class TuckerShape:
    """Mode structure of a Tucker-parameterized d_out×d_in matrix.

    Attributes:
        out_modes: (m_1..m_N), product d_out.
        in_modes: (n_1..n_N), product d_in.
        ranks: (R_1..R_N), each 1 ≤ R_k ≤ J_k = m_k·n_k.
    """

    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_modes", tuple(int(v) for v in self.out_modes))
        object.__setattr__(self, "in_modes", tuple(int(v) for v in self.in_modes))
        object.__setattr__(self, "ranks", tuple(int(v) for v in self.ranks))
        if not len(self.out_modes) == len(self.in_modes) == len(self.ranks) >= 1:
            raise ValueError(
                f"TuckerShape: out_modes {self.out_modes}, in_modes {self.in_modes} and ranks {self.ranks} must have "
                "the same length N ≥ 1 (the tensor order)."
            )
        if min(self.out_modes + self.in_modes) < 1:
            raise ValueError(f"TuckerShape: mode sizes must be ≥ 1, got {self.out_modes} × {self.in_modes}.")
        for k, (rank, size) in enumerate(zip(self.ranks, self.mode_sizes)):
            if not 1 <= rank <= size:
                raise ValueError(f"TuckerShape: rank R_{k + 1}={rank} must be in [1, J_{k + 1}={size}].")

    @classmethod
    def for_matrix(cls, d_out: int, d_in: int, order: int,
                   ranks: int | tuple[int, ...] | list[int] | None) -> TuckerShape:
        """Balanced modes for a d_out×d_in matrix with an int rank r (R_k = min(r, J_k)) or a per-mode list
        (clipped to J_k); None gives `wide_last_mode` (balanced modes with `cheap_mode_ranks` where it has no split)."""
        if ranks is None:
            wide = wide_last_mode(d_out, d_in, order)
            if wide is not None:
                return wide
        return cls.with_ranks(balanced_factors(d_out, order), balanced_factors(d_in, order), ranks)

    @classmethod
    def with_ranks(cls, out_modes: Sequence[int], in_modes: Sequence[int],
                   ranks: int | tuple[int, ...] | list[int] | None) -> TuckerShape:
        """Given modes, with an int rank (R_k = min(r, J_k)), a per-mode list (clipped) or None (`cheap_mode_ranks`)."""
        sizes = [m * n for m, n in zip(out_modes, in_modes)]
        if ranks is None:
            return cheap_mode_ranks(tuple(out_modes), tuple(in_modes))
        wanted = [ranks] * len(sizes) if isinstance(ranks, int) else list(ranks)
        if len(wanted) != len(sizes):
            raise ValueError(f"TuckerShape: {len(wanted)} ranks given for tensor order {len(sizes)}.")
        return cls(tuple(out_modes), tuple(in_modes), tuple(min(r, j) for r, j in zip(wanted, sizes)))

    @property
    def order(self) -> int:
        return len(self.ranks)

    @property
    def mode_sizes(self) -> tuple[int, ...]:
        """J_k = m_k·n_k."""
        return tuple(m * n for m, n in zip(self.out_modes, self.in_modes))

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def key(self) -> str:
        """Bucket name, e.g. 'o43x16x16_i16x16x16_r16x16x16' (a valid buffer name: no dots)."""
        join = lambda values: "x".join(map(str, values))  # noqa: E731
        return f"o{join(self.out_modes)}_i{join(self.in_modes)}_r{join(self.ranks)}"

    @property
    def num_vectors(self) -> int:
        """Σ J_k + Σ R_k: one diagonal scaling per mode index and per rank (TeRA's trainables, both sides)."""
        return sum(self.mode_sizes) + sum(self.ranks)

    @property
    def num_shared(self) -> int:
        """Floats in the frozen core plus factors: ∏ R_k + Σ J_k R_k."""
        return math.prod(self.ranks) + sum(j * r for j, r in zip(self.mode_sizes, self.ranks))


# -- index maps -------------------------------------------------------------------------------------------------


def fold(matrix: Tensor, shape: TuckerShape) -> Tensor:
    """(m, n) matrix → (J_1, …, J_N) tensor with Δ[a, b] = 𝒳[j], j_k = a_k·n_k + b_k."""
    order = shape.order
    # (m, n) -> (m_1..m_N, n_1..n_N) -> (m_1, n_1, …, m_N, n_N) -> (J_1..J_N)
    split = matrix.reshape(*shape.out_modes, *shape.in_modes)
    interleaved = split.permute(*[axis for k in range(order) for axis in (k, order + k)])
    return interleaved.reshape(shape.mode_sizes)


def unfold_view(tensor: Tensor, shape: TuckerShape) -> Tensor:
    """(J_1, …, J_N) tensor → the unfolded matrix as a strided (m_1..m_N, n_1..n_N) view, without copying.

    Adding it to `W.view(m_1..m_N, n_1..n_N)` fuses the unfold permutation into the add (one pass over m·n).
    """
    order = shape.order
    # (J_1..J_N) -> (m_1, n_1, …, m_N, n_N) -> (m_1..m_N, n_1..n_N)
    pairs = tensor.reshape([size for m, n in zip(shape.out_modes, shape.in_modes) for size in (m, n)])
    return pairs.permute(*range(0, 2 * order, 2), *range(1, 2 * order, 2))


def unfold(tensor: Tensor, shape: TuckerShape) -> Tensor:
    """(J_1, …, J_N) tensor → (m, n) matrix; the inverse of `fold`."""
    return unfold_view(tensor, shape).reshape(shape.out_features, shape.in_features)  # (m_1..m_N, n_1..n_N) -> (m, n)


# -- Tucker algebra ---------------------------------------------------------------------------------------------


def mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """𝒯 ×_mode A: contracts axis `mode` (size R) of `tensor` with the columns of `matrix` (J, R)."""
    # (…, R at `mode`, …) · (J, R)ᵀ -> (…, J at the end) -> (…, J at `mode`, …)
    return torch.tensordot(tensor, matrix, dims=([mode], [1])).movedim(-1, mode)


def tucker_to_tensor(core: Tensor, factors: list[Tensor]) -> Tensor:
    """𝒢 ×_1 U_1 ×_2 … ×_N U_N, contracted in mode order (cost Σ_k ∏_{l≤k} J_l ∏_{l≥k} R_l MACs)."""
    out = core
    for mode, factor in enumerate(factors):
        out = mode_product(out, factor, mode)
    return out


def hosvd(tensor: Tensor, ranks: tuple[int, ...] | list[int], init: SVDInit = SVDInit()) -> tuple[Tensor, list[Tensor]]:
    """Truncated higher-order SVD (De Lathauwer et al., 2000): 𝒳 ≈ 𝒢 ×_k U_k.

    U_k = top-R_k left singular vectors of the mode-k unfolding X_(k) (J_k × ∏_{l≠k} J_l), 𝒢 = 𝒳 ×_k U_kᵀ.
    Exact when the multilinear rank of 𝒳 is at most `ranks`. Runs in fp32 (`truncated_svd`). A rank above the
    unfolding's min(J_k, ∏_{l≠k} J_l) (which `TuckerShape` allows on tiny modes) is clipped to it.

    Returns:
        core (R'_1..R'_N) and factors [U_k (J_k × R'_k)] with orthonormal columns, fp32, R'_k = R_k clipped.
    """
    if len(ranks) != tensor.dim():
        raise ValueError(
            f"hosvd: {len(ranks)} ranks for an order-{tensor.dim()} tensor of shape {tuple(tensor.shape)}; "
            "give one rank per mode."
        )
    work = tensor.float()
    factors = []
    for mode, rank in enumerate(ranks):
        unfolding = work.movedim(mode, 0).reshape(work.shape[mode], -1)  # (J_k, ∏_{l≠k} J_l)
        U, _, _ = truncated_svd(unfolding, min(rank, *unfolding.shape), init)
        factors.append(U)
    core = work
    for mode, factor in enumerate(factors):
        core = mode_product(core, factor.T, mode)
    return core, factors


def cheap_mode_ranks(out_modes: tuple[int, ...], in_modes: tuple[int, ...], rank: int = 16) -> TuckerShape:
    """R_k = min(rank, J_k) on every mode but one, which gets R_k = 1: the one whose per-token contraction
    (`apply_macs` with that mode unmerged: n·m_k + (n/n_k)·m) is cheapest, first on ties.

    With one rank-1 mode Δ = P ⊗ M_k (P a rank-`rank` Tucker network over the other modes), so x Δᵀ costs
    ≈ n·m/n_k MACs per token, not the m·n GEMM that a full-rank mode forces (spec §1.6); rank(Δ) stays
    min(d_out, d_in) for generic vectors.
    """
    wide = [min(rank, m * n) for m, n in zip(out_modes, in_modes)]
    shapes = [TuckerShape(out_modes, in_modes, tuple(1 if l == k else r for l, r in enumerate(wide)))
              for k in range(len(wide))]
    k = min(range(len(shapes)), key=lambda k: apply_macs(shapes[k], k)[1])
    return shapes[k]


def wide_last_mode(d_out: int, d_in: int, order: int, rank: int = 16) -> TuckerShape | None:
    """The default layout: a rank-1 last mode sized by `kronecker_splits`, the other N−1 modes balanced over the rest.

    Then Δ = P ⊗ M_N with P = 𝒢 ×_{l<N} Ũ_l a rank-`rank` Tucker network over the (d_out/m_N)×(d_in/n_N) remainder and
    M_N = reshape(Ũ_N, (m_N, n_N)). The cheapest split whose trainables (`num_vectors`) stay below min(d_out, d_in) =
    rank(Δ) wins: at 4096² modes (16, 8, 32)², ranks (16, 16, 1), 1,377 trainables, 32·4096 + 128·4096 MACs per token
    per pass against 16·4096 + 256·4096 for balanced modes. None where no split qualifies.
    """
    for _, m_w, n_w in kronecker_splits(d_out, d_in):
        out_modes = balanced_factors(d_out // m_w, order - 1) + (m_w,)
        in_modes = balanced_factors(d_in // n_w, order - 1) + (n_w,)
        ranks = tuple(min(rank, m * n) for m, n in zip(out_modes[:-1], in_modes[:-1])) + (1,)
        shape = TuckerShape(out_modes, in_modes, ranks)
        if shape.num_vectors < min(d_out, d_in):
            return shape
    return None


def _kronecker_chain(x: Tensor, mats: list[Tensor]) -> Tensor:
    """x (M_1 ⊗ … ⊗ M_N)ᵀ for x (T, n_1..n_N) and M_k (m_k, n_k): one GEMM per mode, last mode first."""
    cur = x
    for k in reversed(range(len(mats))):
        cur = cur @ mats[k].T  # (T, m_{>k}, n_{≤k}) · (n_k, m_k) -> (T, m_{>k}, n_{<k}, m_k)
        cur = cur.movedim(-1, 1)  # -> (T, m_{≥k}, n_{<k}); after the last step (T, m_1..m_N)
    return cur


def unmerged_core(core: Tensor, factors: list[Tensor], shape: TuckerShape, k: int) -> Tensor:
    """P_k = 𝒢 ×_{l≠k} U_l with each J_l split into (m_l, n_l): shape (m_l, n_l for l≠k; R_k at position k)."""
    merged = core
    for l in range(shape.order):
        if l != k:
            merged = mode_product(merged, factors[l], l)  # R_l -> J_l: (J_1.., R_k, ..J_N)
    # (J_1.., R_k, ..J_N) -> (m_l, n_l for l≠k; R_k at position k)
    pairs = [size for l in range(shape.order)
             for size in ((shape.out_modes[l], shape.in_modes[l]) if l != k else (shape.ranks[k],))]
    return merged.reshape(pairs)


@dataclass(frozen=True)
class UnmergedIndices:
    """einsum subscripts of the unmerged-mode-k contraction (token index "t"): a / b the out / in modes,
    cube U_k as (m_k, n_k, R_k), p = P_k in `unmerged_core`'s layout, z = Z = x ×_{n_k} U_k as
    (t, n_{l≠k}, m_k, R_k)."""

    a: str
    b: str
    cube: str
    p: str
    z: str


def unmerged_indices(order: int, k: int) -> UnmergedIndices:
    letters = iter(string.ascii_letters.replace("t", ""))
    a = [next(letters) for _ in range(order)]
    b = [next(letters) for _ in range(order)]
    r = next(letters)  # rank index of mode k
    others = "".join(b[l] for l in range(order) if l != k)
    p = "".join(a[l] + b[l] if l != k else r for l in range(order))
    return UnmergedIndices("".join(a), "".join(b), f"{a[k]}{b[k]}{r}", p, f"t{others}{a[k]}{r}")


def tucker_apply(x: Tensor, core: Tensor, factors: list[Tensor], shape: TuckerShape, mode: int | None = None) -> Tensor:
    """x Δᵀ for Δ = unfold(𝒢 ×_l U_l), without forming Δ.

    Two plans, both GEMM-shaped (sweeping the modes one at a time keeps every rank index alive: fewer MACs for
    R ≥ 2 but R_k R_l-times larger, badly laid-out intermediates, 2-10x slower on CPU, measured):

    * `is_kronecker(shape)`: Δ = ⊗_l M_l exactly, applied as a chain of N small GEMMs, intermediates no larger
      than the input or output.
    * otherwise all modes but k are merged into the core once, P = 𝒢 ×_{l≠k} U_l (size m·n·R_k/J_k, independent of
      the tokens); Z = x ×_{n_k} U_k swaps in-mode k for (out-mode k, rank k), and
      y[t, a] = Σ_{b_{l≠k}, r_k} P[(a_l, b_l)_{l≠k}, r_k] · Z[t, b_{l≠k}, a_k, r_k].

    Cost: `apply_macs(shape, k)`.

    Args:
        x: (T, n) inputs.
        core: (R_1..R_N); factors: [U_k (J_k × R_k)], any float dtype matching x.
        shape: the mode structure; mode: the unmerged mode k, default `best_mode(shape)` (ignored for Kronecker).

    Returns:
        (T, m) outputs.
    """
    order, tokens = shape.order, x.shape[0]
    cubes = [f.reshape(m, n, r) for f, m, n, r in zip(factors, shape.out_modes, shape.in_modes, shape.ranks)]
    if is_kronecker(shape):
        k = max(range(order), key=lambda l: shape.ranks[l])  # the one mode that may have R_k > 1
        weights = core.reshape(shape.ranks[k])  # (1..R_k..1) -> (R_k,)
        mats = [cube[..., 0] if l != k else cube @ weights for l, cube in enumerate(cubes)]  # each (m_l, n_l)
        out = _kronecker_chain(x.reshape(tokens, *shape.in_modes), mats)  # (T, n) -> (T, n_1..n_N) -> (T, m_1..)
        return out.reshape(tokens, shape.out_features)
    k = best_mode(shape) if mode is None else mode
    idx = unmerged_indices(order, k)
    z = torch.einsum(f"t{idx.b},{idx.cube}->{idx.z}",
                     x.reshape(tokens, *shape.in_modes), cubes[k])  # (T, n_1..n_N) -> (T, n_{l≠k}, m_k, R_k)
    merged = unmerged_core(core, factors, shape, k)  # (m_l, n_l for l≠k; R_k at k)
    out = torch.einsum(f"{idx.z},{idx.p}->t{idx.a}", z, merged)
    return out.reshape(tokens, shape.out_features)  # (T, m_1..m_N) -> (T, m)


def outer_chain(core: Tensor, factors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """P = 𝒢 ×_1 U_1 … ×_{N−1} U_{N−1} with its rank axis first, (…, R_N, J_1·…·J_{N−1}), in the inputs' dtype, and
    the left operand M_k of each product (views; TeRA's hand-written backward, adapters/tera_network.py, reads them).
    Factors (…, J_k, R_k) may carry leading batch axes (one network per layer of a bucket); the core has none.

    Each product contracts the leading axis and appends the new one, C_k = M_k U_kᵀ with M_k = C_{k−1} as
    (R_k, rest)ᵀ: one mm on transposed views, no copies (TeRA forms this network every step: ops are host time).
    """
    batch = tuple(factors[0].shape[:-2])
    chain, inputs = core, []
    for k, factor in enumerate(factors[:-1]):  # (…, R_k, rest) -> (…, rest, R_k) @ (…, R_k, J_k) -> (…, rest, J_k)
        inputs.append(chain.reshape(*(batch if k else ()), factor.shape[-1], -1).mT)  # M_1 comes from the core
        chain = inputs[-1] @ factor.mT
    return chain.reshape(*(batch if len(factors) > 1 else ()), core.shape[-1], -1), inputs  # -> (…, R_N, J')


def outer_as_kronecker(chain: Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> Tensor:
    """(…, R_N, J') from `outer_chain` → A (…, R_N, m', n'), A_r = unfold'(P[:, r]) over the outer modes (one copy)."""
    batch, order = chain.shape[:-1], len(out_modes)  # batch includes R_N
    lead = len(batch)
    pairs = chain.reshape(*batch, *[s for m, n in zip(out_modes[:-1], in_modes[:-1]) for s in (m, n)])  # (…, m_1, n_1, …)
    split = pairs.permute(*range(lead), *range(lead, lead + 2 * order - 2, 2), *range(lead + 1, lead + 2 * order - 2, 2))
    return split.reshape(*batch, math.prod(out_modes[:-1]), math.prod(in_modes[:-1]))  # (…, m_1.., n_1..) -> (…, m', n')


def last_as_kronecker(last: Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> Tensor:
    """U_N (…, J_N, R_N) → B (…, R_N, m_N, n_N), B_r = reshape(U_N[:, r], (m_N, n_N)): `outer_as_kronecker`'s partner."""
    return last.mT.reshape(*last.shape[:-2], last.shape[-1], out_modes[-1], in_modes[-1])  # (…, J_N, R) -> (…, R, m_N, n_N)


def last_mode_outer(core: Tensor, factors: list[Tensor], shape: TuckerShape) -> Tensor:
    """P = 𝒢 ×_{l<N} U_l as a (m'·n', R_N) matrix, rows (a', b') = ((a_1..a_{N−1}), (b_1..b_{N−1})) row-major (the
    factors A_r of `outer_as_kronecker` side by side): Δ[(a', a_N), (b', b_N)] = Σ_r P[(a', b'), r] U_N[(a_N, b_N), r]."""
    A = outer_as_kronecker(outer_chain(core, factors)[0], shape.out_modes, shape.in_modes)  # (R_N, m', n')
    return A.reshape(shape.ranks[-1], -1).T.contiguous()  # (R_N, m'·n') -> (m'·n', R_N), rows contiguous


def last_mode_delta_rows(outer: Tensor, last_factor: Tensor, shape: TuckerShape) -> Tensor:
    """Δ with its rows reordered to (a_N, a'), as an (m_N, m', n) tensor: one GEMM per out-index a_N.

    Row a = (a', a_N) of Δ is row (a_N, a') here; the column index b = (b', b_N) is unchanged, so adding it to
    `W.view(m', m_N, n)` is a row gather (contiguous rows of n), not an element-wise permutation.
    Cost m·n·R_N MACs (`last_mode_build_macs`).
    """
    m_last, n_last, rank = shape.out_modes[-1], shape.in_modes[-1], shape.ranks[-1]
    cube = last_factor.reshape(m_last, n_last, rank)  # (J_N, R_N) -> (m_N, n_N, R_N)
    rows = torch.empty(m_last, outer.shape[0], n_last, dtype=outer.dtype, device=outer.device)
    for a_last in range(m_last):
        torch.mm(outer, cube[a_last].T, out=rows[a_last])  # (m'n', R_N) @ (R_N, n_N) -> (m'n', n_N)
    return rows.view(m_last, shape.out_features // m_last, shape.in_features)  # -> (m_N, m', n'·n_N = n)
