"""init/tucker.py: tensorization, Tucker algebra and seeded shared factors against float64 / closed-form references."""

import itertools
import math

import pytest
import torch

from specpeft.init.tucker import (
    TuckerShape,
    balanced_factors,
    fold,
    hosvd,
    mode_product,
    prime_factors,
    tucker_apply,
    tucker_to_tensor,
    unfold,
)
from specpeft.init.tucker_cost import apply_macs, best_mode, build_macs, is_kronecker
from specpeft.init.tucker_random import bucket_seed, shared_random_factors, split_shared

SPEC_SHAPE = TuckerShape((4, 3, 5), (2, 4, 3), (3, 2, 4))  # spec §1.9 check 2: m = 60, n = 24


def _random_tucker(shape: TuckerShape, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(shape.ranks, generator=gen, dtype=torch.float64)
    factors = [torch.randn(j, r, generator=gen, dtype=torch.float64) for j, r in zip(shape.mode_sizes, shape.ranks)]
    return core, factors


def _kronecker_sum(core: torch.Tensor, factors: list[torch.Tensor], shape: TuckerShape) -> torch.Tensor:
    """Δ = Σ_r 𝒢[r] · M_1^{(r_1)} ⊗ … ⊗ M_N^{(r_N)}, M_k^{(r)} = reshape(U_k[:, r], (m_k, n_k)) (spec §1.2)."""
    delta = torch.zeros(shape.out_features, shape.in_features, dtype=torch.float64)
    for r in itertools.product(*(range(rank) for rank in shape.ranks)):
        term = torch.ones(1, 1, dtype=torch.float64)
        for k, factor in enumerate(factors):
            term = torch.kron(term, factor[:, r[k]].reshape(shape.out_modes[k], shape.in_modes[k]))
        delta += core[r] * term
    return delta


@pytest.mark.parametrize(
    "dim, modes",
    [(4096, (16, 16, 16)), (11008, (43, 16, 16)), (3072, (16, 16, 12)), (768, (12, 8, 8)), (14336, (32, 28, 16)),
     (13, (13, 1, 1)), (1, (1, 1, 1))],
)
def test_balanced_factors_match_spec_table(dim: int, modes: tuple[int, ...]) -> None:
    assert balanced_factors(dim, 3) == modes


def test_balanced_factors_tile_every_dimension() -> None:
    for dim in [*range(1, 130), 997, 1009 * 2, 11008, 5120, 151936]:
        for order in (2, 3, 4):
            modes = balanced_factors(dim, order)
            assert len(modes) == order and math.prod(modes) == dim and list(modes) == sorted(modes, reverse=True)
    assert prime_factors(11008) == [2] * 8 + [43]


def test_for_matrix_clips_ranks_and_counts() -> None:
    shape = TuckerShape.for_matrix(11008, 4096, 3, 16)
    assert shape.out_modes == (43, 16, 16) and shape.in_modes == (16, 16, 16)
    assert shape.mode_sizes == (688, 256, 256) and shape.ranks == (16, 16, 16)
    assert shape.num_shared == 4096 + 16 * (688 + 256 + 256)  # spec §1.3 table: 4,096 + 19,200
    tiny = TuckerShape.for_matrix(6, 2, 2, [5, 5])  # modes (3, 2) × (2, 1): J = (6, 2)
    assert tiny.ranks == (5, 2)
    with pytest.raises(ValueError, match="R_1"):
        TuckerShape((2, 2), (2, 2), (5, 1))


def test_fold_unfold_index_map() -> None:
    """Spec §1.9 check 1: unfold(fold(Δ)) = Δ and Δ[a, b] = 𝒳[j] with j_k = a_k n_k + b_k."""
    shape = SPEC_SHAPE
    delta = torch.randn(shape.out_features, shape.in_features, dtype=torch.float64)
    tensor = fold(delta, shape)
    assert tensor.shape == shape.mode_sizes
    assert torch.equal(unfold(tensor, shape), delta)
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        a, b = (int(torch.randint(0, d, (1,), generator=gen)) for d in (shape.out_features, shape.in_features))
        a_idx = torch.unravel_index(torch.tensor(a), shape.out_modes)
        b_idx = torch.unravel_index(torch.tensor(b), shape.in_modes)
        j = tuple(int(ak) * nk + int(bk) for ak, bk, nk in zip(a_idx, b_idx, shape.in_modes))
        assert tensor[j] == delta[a, b]


def test_tucker_build_equals_kronecker_sum() -> None:
    """Spec §1.9 check 2 (float64, < 1e-12)."""
    core, factors = _random_tucker(SPEC_SHAPE)
    delta = unfold(tucker_to_tensor(core, factors), SPEC_SHAPE)
    torch.testing.assert_close(delta, _kronecker_sum(core, factors, SPEC_SHAPE), atol=1e-12, rtol=0)


def test_mode_product_matches_unfolding_identity() -> None:
    """(𝒯 ×_k A)_(k) = A · T_(k) on mode-k unfoldings."""
    tensor = torch.randn(3, 4, 5, dtype=torch.float64)
    matrix = torch.randn(6, 4, dtype=torch.float64)
    out = mode_product(tensor, matrix, 1)
    assert out.shape == (3, 6, 5)
    unfold_1 = lambda t: t.movedim(1, 0).reshape(t.shape[1], -1)  # noqa: E731
    torch.testing.assert_close(unfold_1(out), matrix @ unfold_1(tensor), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "shape",
    [SPEC_SHAPE, TuckerShape((2, 3, 2, 2), (3, 2, 2, 1), (2, 3, 1, 2)), TuckerShape((5, 3), (4, 2), (7, 2)),
     TuckerShape((4, 3, 5), (2, 4, 3), (1, 1, 1)), TuckerShape((4, 3, 5), (2, 4, 3), (1, 5, 1))],  # Kronecker plans
)
def test_factored_apply_equals_dense(shape: TuckerShape) -> None:
    core, factors = _random_tucker(shape, seed=1)
    delta = unfold(tucker_to_tensor(core, factors), shape)
    x = torch.randn(7, shape.in_features, dtype=torch.float64)
    for mode in range(shape.order):
        torch.testing.assert_close(tucker_apply(x, core, factors, shape, mode), x @ delta.T, atol=1e-11, rtol=0)
    if is_kronecker(shape):  # one Kronecker product: Σ_k (∏_{l≤k} n_l)(∏_{l≥k} m_l) MACs per token
        assert apply_macs(shape)[1] == sum(math.prod(shape.in_modes[: k + 1]) * math.prod(shape.out_modes[k:])
                                           for k in range(shape.order))
    else:
        assert best_mode(shape) == min(range(shape.order), key=lambda k: apply_macs(shape, k)[1])


def test_cost_model_matches_spec_table() -> None:
    """Spec §1.3: the 4096×4096 build at N = 3, R = 16 is ≈ 286 M MACs; the factored form costs ≈ m·n per token."""
    shape = TuckerShape.for_matrix(4096, 4096, 3, 16)
    assert build_macs(shape) == 256 * 16**3 + 256**2 * 16**2 + 256**3 * 16
    pre, per_token = apply_macs(shape, 2)
    assert pre == 256 * 16**3 + 256**2 * 16**2
    assert per_token == 4096 * 16 * 16 + 256 * 16 * 4096  # ≈ 1.06·m·n: no cheaper than dense at R = 16
    wide = TuckerShape.for_matrix(3072, 768, 3, 4)  # in-modes (12, 8, 8): leave the largest n_k unmerged
    assert best_mode(wide) == 0 and apply_macs(wide, 0)[1] < apply_macs(wide, 2)[1]


def test_hosvd_recovers_planted_tucker() -> None:
    shape = TuckerShape((3, 4, 2), (2, 3, 5), (2, 3, 4))
    core, factors = _random_tucker(shape, seed=2)
    tensor = tucker_to_tensor(core, [torch.linalg.qr(f)[0] for f in factors])  # multilinear rank = ranks
    got_core, got_factors = hosvd(tensor, shape.ranks)
    for factor, rank in zip(got_factors, shape.ranks):
        torch.testing.assert_close(factor.T @ factor, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(tucker_to_tensor(got_core, got_factors).double(), tensor, atol=1e-5, rtol=0)
    truncated_core, truncated = hosvd(tensor, (1, 1, 1))
    assert tucker_to_tensor(truncated_core, truncated).shape == tensor.shape
    with pytest.raises(ValueError, match="3 ranks"):
        hosvd(tensor.reshape(6, 12, 10, 1), (1, 1, 1))
    # a prime-sized layer: TuckerShape allows R_1 = 2 on modes (77, 1, 1), whose mode-1 unfolding has rank ≤ 1
    prime = TuckerShape.for_matrix(7, 11, 3, 2)
    assert prime.mode_sizes == (77, 1, 1) and prime.ranks == (2, 1, 1)
    planted = torch.randn(77, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got_core, got_factors = hosvd(planted, prime.ranks)
    assert got_core.shape == (1, 1, 1) and [f.shape for f in got_factors] == [(77, 1), (1, 1), (1, 1)]
    torch.testing.assert_close(tucker_to_tensor(got_core, got_factors).double(), planted, atol=1e-5, rtol=0)


def test_shared_factors_are_seeded_and_variance_matched() -> None:
    shape = TuckerShape.for_matrix(256, 192, 3, 8)
    flat = shared_random_factors(7, shape)
    assert flat.dtype == torch.float32 and flat.device.type == "cpu" and flat.numel() == shape.num_shared
    assert torch.equal(flat, shared_random_factors(7, shape))
    assert not torch.equal(flat, shared_random_factors(8, shape))
    other = TuckerShape.for_matrix(192, 256, 3, 8)  # transposed shape: its own bucket and stream
    assert bucket_seed(7, shape) != bucket_seed(7, other) and 0 <= bucket_seed(7, shape) < 2**63
    core, factors = split_shared(flat, shape)
    assert core.data_ptr() == flat.data_ptr()  # views, no copy
    assert abs(core.var().item() * shape.in_features - 1) < 0.3  # 𝒢 ~ 1/n (512 draws)
    for factor, rank in zip(factors, shape.ranks):
        assert abs(factor.var().item() * rank - 1) < 0.1 and abs(factor.mean().item()) < 0.05 / math.sqrt(rank)
    delta = unfold(tucker_to_tensor(core.double(), [f.double() for f in factors]), shape)
    assert abs(delta.var().item() * shape.in_features - 1) < 0.4  # spec §1.4: each entry of Δ has variance ≈ 1/n
    with pytest.raises(ValueError, match="another mode shape"):
        split_shared(flat[:-1], shape)
