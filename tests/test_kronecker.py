"""specpeft.init.kronecker: the spec §2.11 self-checks against float64 references built from the definitions."""

from __future__ import annotations

import itertools

import pytest
import torch

from specpeft.init.kronecker import (
    KroneckerShape,
    allocate_budget,
    choose_factor_shape,
    kpsvd,
    kron_sum,
    rearrange,
    select_rank,
    unrearrange,
)
from specpeft.init.svd import SVDInit

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rearrange_by_definition(w: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> torch.Tensor:
    """R(W)[i·n1 + j, k·n2 + l] = W[i·m2 + k, j·n2 + l], entry by entry (independent of the reshape code)."""
    out = torch.empty(m1 * n1, m2 * n2, dtype=w.dtype)
    for i, j, k, l in itertools.product(range(m1), range(n1), range(m2), range(n2)):
        out[i * n1 + j, k * n2 + l] = w[i * m2 + k, j * n2 + l]
    return out


def planted_sum(terms: int, a_shape: tuple[int, int], b_shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return sum(torch.kron(torch.randn(*a_shape, generator=g, dtype=F64), torch.randn(*b_shape, generator=g, dtype=F64))
               for _ in range(terms))


# -- rearrangement ----------------------------------------------------------------------------------------------


def test_rearrangement_matches_definition_and_round_trips() -> None:
    w = torch.randn(3 * 4, 5 * 2, generator=gen(), dtype=F64)
    r = rearrange(w, (3, 5), (4, 2))
    assert torch.equal(r, rearrange_by_definition(w, 3, 5, 4, 2))
    assert torch.equal(unrearrange(r, (3, 5), (4, 2)), w)
    assert torch.equal(rearrange(unrearrange(r, (3, 5), (4, 2)), (3, 5), (4, 2)), r)


def test_rearranged_kron_is_outer_product_of_vecs() -> None:
    a = torch.randn(3, 5, generator=gen(1), dtype=F64)
    b = torch.randn(4, 2, generator=gen(2), dtype=F64)
    torch.testing.assert_close(rearrange(torch.kron(a, b), (3, 5), (4, 2)), torch.outer(a.flatten(), b.flatten()),
                               atol=0, rtol=0)


def test_rearrange_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="pad the weight"):
        rearrange(torch.zeros(11, 10), (3, 5), (4, 2))


# -- KPSVD ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("terms", [1, 3])
def test_exact_recovery_of_planted_kronecker_sums(terms: int) -> None:
    w = planted_sum(terms, (3, 5), (4, 2))
    shape = KroneckerShape((3, 5), (4, 2), (12, 10))
    all_sigma = torch.linalg.svdvals(rearrange_by_definition(w, 3, 5, 4, 2))
    assert int((all_sigma > 1e-10 * all_sigma[0]).sum()) == terms  # exactly `terms` non-zero σ
    fac = kpsvd(w, shape, terms)
    assert fac.A.dtype == F64 and fac.A.shape == (terms, 3, 5) and fac.B.shape == (terms, 4, 2)
    err = torch.linalg.norm(w - kron_sum(fac.A, fac.B)) / torch.linalg.norm(w)
    assert err < 1e-12
    torch.testing.assert_close(fac.sigma, all_sigma[:terms], atol=1e-12, rtol=0)
    # balanced split: ‖A_k‖_F = ‖B_k‖_F = √σ_k
    torch.testing.assert_close(fac.A.flatten(1).norm(dim=1), fac.sigma.sqrt(), atol=1e-12, rtol=0)
    torch.testing.assert_close(fac.B.flatten(1).norm(dim=1), fac.sigma.sqrt(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("rank", [1, 2, 5, 9])
def test_truncation_error_equals_tail_energy(rank: int) -> None:
    w = torch.randn(6 * 4, 3 * 5, generator=gen(3), dtype=F64)
    fac = kpsvd(w, KroneckerShape((6, 3), (4, 5), (24, 15)), rank)
    sigma = torch.linalg.svdvals(rearrange_by_definition(w, 6, 3, 4, 5))  # independent reference spectrum
    err = float(torch.linalg.norm(w - kron_sum(fac.A, fac.B)))
    assert err == pytest.approx(float(sigma[rank:].pow(2).sum().sqrt()), rel=1e-10, abs=1e-12)
    assert fac.total_energy == pytest.approx(float(w.pow(2).sum()), rel=1e-12)


def test_fp32_randomized_kpsvd_is_near_optimal() -> None:
    w = planted_sum(2, (16, 16), (16, 16), seed=4) + 1e-3 * torch.randn(256, 256, generator=gen(5), dtype=F64)
    shape = choose_factor_shape(256, 256)
    fac = kpsvd(w.float(), shape, 2, SVDInit(kind="randomized"))
    assert fac.A.dtype == torch.float32
    sigma = torch.linalg.svdvals(rearrange(w, shape.a_shape, shape.b_shape))
    err = float(torch.linalg.norm(w - kron_sum(fac.A.double(), fac.B.double())))
    assert err <= 1.01 * float(sigma[2:].pow(2).sum().sqrt())


def test_kpsvd_of_prime_dims_pads_and_is_exact_at_full_rank() -> None:
    w = torch.randn(7, 11, generator=gen(6), dtype=F64)
    shape = choose_factor_shape(7, 11)
    assert shape.padding != (0, 0)
    fac = kpsvd(w, shape, shape.max_components)
    torch.testing.assert_close(kron_sum(fac.A, fac.B)[:7, :11], w, atol=1e-12, rtol=0)
    # truncated: the cropped error is at most the padded-space tail energy
    fac2 = kpsvd(w, shape, 2)
    err = float(torch.linalg.norm(w - kron_sum(fac2.A, fac2.B)[:7, :11]))
    assert err**2 <= fac2.total_energy - float(fac2.sigma.pow(2).sum()) + 1e-12


def test_kpsvd_4099x4096_prime_rows() -> None:
    g = gen(7)
    a, b = torch.randn(64, 64, generator=g), torch.randn(65, 64, generator=g)
    w = torch.kron(a, b)[:4099] + 1e-3 * torch.randn(4099, 4096, generator=g)  # cropped Kronecker + noise
    shape = choose_factor_shape(4099, 4096)
    assert (shape.a_shape, shape.b_shape, shape.padding) == ((64, 64), (65, 64), (61, 0))
    fac = kpsvd(w, shape, 2, SVDInit(kind="randomized", niter=1))  # one dominant component: 1 power step suffices
    approx = kron_sum(fac.A, fac.B)[:4099]
    assert float(torch.linalg.norm(w - approx) / torch.linalg.norm(w)) < 0.05
    assert float(fac.sigma[0] ** 2) / fac.total_energy > 0.99


def test_kpsvd_errors_name_the_problem() -> None:
    shape = KroneckerShape((2, 2), (2, 2), (4, 4))
    with pytest.raises(ValueError, match="rank=5"):
        kpsvd(torch.randn(4, 4), shape, 5)
    with pytest.raises(ValueError, match="matrix_shape"):
        kpsvd(torch.randn(4, 5), shape, 1)


# -- factor shapes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dims, a_shape, b_shape",
    [((4096, 4096), (64, 64), (64, 64)), ((11008, 4096), (86, 64), (128, 64)), ((4096, 11008), (64, 86), (64, 128)),
     ((768, 768), (24, 24), (32, 32)), ((3072, 768), (48, 32), (64, 24))],
)
def test_factor_shapes_reproduce_spec_table(dims, a_shape, b_shape) -> None:
    shape = choose_factor_shape(*dims)
    assert (shape.a_shape, shape.b_shape, shape.padding) == (a_shape, b_shape, (0, 0))
    assert shape.rank_cap >= min(dims)


def _brute_force_min_params(d_out: int, d_in: int) -> int | None:
    best = None
    for m1 in range(1, d_out + 1):
        for n1 in range(1, d_in + 1):
            if d_out % m1 or d_in % n1:
                continue
            m2, n2 = d_out // m1, d_in // n1
            params = m1 * n1 + m2 * n2
            if min(m1, n1) * min(m2, n2) >= min(d_out, d_in) and params <= 2 * (d_out + d_in):
                best = params if best is None else min(best, params)
    return best


@pytest.mark.parametrize("d_out, d_in", [(d_out, d_in) for d_out in (1, 6, 7, 12, 24, 40, 49) for d_in in (3, 8, 11, 27, 36)])
def test_factor_shape_rule_against_brute_force(d_out: int, d_in: int) -> None:
    shape = choose_factor_shape(d_out, d_in)
    (m1, n1), (m2, n2) = shape.a_shape, shape.b_shape
    assert shape.rank_cap >= min(d_out, d_in)  # (a)
    expected = _brute_force_min_params(d_out, d_in)
    if expected is not None:  # a split of the true dims exists: no padding, fewest params (b)
        assert shape.padding == (0, 0) and shape.params_per_component == expected
    else:  # padded: (a) and (d) hold for the padded dims
        out_p, in_p = shape.padded_shape
        assert out_p >= d_out and in_p >= d_in and shape.padding != (0, 0)
        assert shape.params_per_component <= 2 * (out_p + in_p)


def test_prime_dims_are_padded() -> None:
    assert choose_factor_shape(7, 11).padding == (1, 1)
    assert choose_factor_shape(4096, 4099).b_shape == (64, 65)


# -- rank selection ---------------------------------------------------------------------------------------------


def test_select_rank_rules() -> None:
    sigma = torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8, 0.7, 0.6])
    total = float(sigma.pow(2).sum())
    # energy: cumulative σ² = 100, 181, 245, 246, 246.81, 247.45, ... of 248.3 -> τ=0.9 needs 3, τ=0.995 needs 6
    assert select_rank(sigma, total, "energy", 0.9) == 3
    assert select_rank(sigma, total, "energy", 0.995) == 6
    # elbow (Kneedle): max of (1 − x_i) − y_i is at i = 4, the first small value
    assert select_rank(sigma, total, "elbow") == 4
    assert select_rank(sigma, total, "min", 0.995) == 4
    assert select_rank(sigma, total, "min", 0.9) == 3
    assert select_rank(sigma, total, "max", 0.995) == 6
    assert select_rank(sigma, total, "max", 0.995, max_rank=2) == 2
    # total energy from ‖W‖² beyond the partial spectrum: τ never reached -> all supplied components
    assert select_rank(sigma, 10 * total, "energy", 0.9) == 8
    with pytest.raises(ValueError, match="rule"):
        select_rank(sigma, total, "median")  # type: ignore[arg-type]


def test_select_rank_log_elbow() -> None:
    # geometric decay with a cliff: on σ the elbow sits at the first big drop, on log σ at the cliff
    sigma = torch.tensor([100.0, 10.0, 1.0, 0.5, 0.25, 1e-6, 1e-6, 1e-6])
    assert select_rank(sigma, float(sigma.pow(2).sum()), "elbow") == 2
    assert select_rank(sigma, float(sigma.pow(2).sum()), "elbow", elbow_log=True) == 6


def test_allocate_budget_greedy_by_energy_per_param() -> None:
    sigmas = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([5.0, 1.0])]
    totals = [14.0, 26.0]
    costs = [10, 20]
    # gains per param: layer0 k=2: 4/140=.0286, k=3: 1/140=.0071; layer1 k=2: 1/520=.0019
    assert allocate_budget(sigmas, totals, costs, 30) == [1, 1]
    assert allocate_budget(sigmas, totals, costs, 40) == [2, 1]
    assert allocate_budget(sigmas, totals, costs, 59) == [3, 1]
    assert allocate_budget(sigmas, totals, costs, 80) == [3, 2]
    assert allocate_budget(sigmas, totals, costs, 10**6) == [3, 2]
    with pytest.raises(ValueError, match="param_budget=29"):
        allocate_budget(sigmas, totals, costs, 29)


# -- dense sum (merge) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a_shape, b_shape", [((4, 6), (5, 3)), ((6, 3), (2, 7)), ((8, 8), (8, 8)), ((1, 5), (7, 1))])
@pytest.mark.parametrize("terms", [1, 3])
def test_kron_sum_equals_dense_kron(a_shape, b_shape, terms: int) -> None:
    g = gen(8)
    A = torch.randn(terms, *a_shape, generator=g, dtype=F64)
    B = torch.randn(terms, *b_shape, generator=g, dtype=F64)
    dense = sum(torch.kron(A[k], B[k]) for k in range(terms))
    torch.testing.assert_close(kron_sum(A, B), dense, atol=0, rtol=0)
