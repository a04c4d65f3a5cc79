"""Tests for specpeft.init.svd: optimality against float64 references, randomized accuracy, rank rules, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from specpeft.init.svd import SVDInit, elbow_rank, energy_rank, svd_by_energy, truncated_svd

RANDOMIZED = SVDInit(kind="randomized")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The matrices here are tiny; with 2 OpenMP threads on a busy 2-core box every small LAPACK call waits on a
    # descheduled worker, and this file went from ~1 s to minutes. One thread keeps it fast and steady.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 W = Q1 diag(σ) Q2ᵀ with Haar-like orthonormal Q1 (m×k), Q2 (n×k); returns W, Q1, Q2."""
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    q1 = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (q1 * sigma) @ q2.T, q1, q2


def recon_error(w64: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.linalg.norm(w64 - (u.double() * s.double()) @ v.double().T))


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest principal cosine between span(a) and span(b) (both with orthonormal columns)."""
    return float(torch.linalg.svdvals(a.double().T @ b.double()).min())


def power_law(k: int, exponent: float) -> torch.Tensor:
    return torch.arange(1, k + 1, dtype=torch.float64) ** -exponent


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
@pytest.mark.parametrize("rank", [1, 10, 60, 120])
def test_full_error_equals_optimal_tail(shape: tuple[int, int], rank: int) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ref = torch.linalg.svdvals(w.double())  # independent float64 reference on the same matrix
    u, s, v = truncated_svd(w, rank)
    m, n = shape
    assert u.shape == (m, rank) and s.shape == (rank,) and v.shape == (n, rank)
    assert u.dtype == s.dtype == v.dtype == torch.float32
    assert torch.all(s[:-1] >= s[1:])
    eye = torch.eye(rank, dtype=torch.float64)
    assert torch.allclose(u.double().T @ u.double(), eye, atol=1e-5)
    assert torch.allclose(v.double().T @ v.double(), eye, atol=1e-5)
    torch.testing.assert_close(s.double(), ref[:rank], rtol=1e-5, atol=1e-5)
    optimal = float(ref[rank:].pow(2).sum().sqrt())
    assert abs(recon_error(w.double(), u, s, v) - optimal) <= 2e-5 * float(ref.norm())


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
@pytest.mark.parametrize(("exponent", "rank"), [(1.0, 20), (0.5, 10)])
def test_randomized_near_optimal_on_decaying_spectrum(shape: tuple[int, int], exponent: float, rank: int) -> None:
    sigma = power_law(120, exponent)
    w64, q1, q2 = planted(*shape, sigma)
    optimal = float(sigma[rank:].pow(2).sum().sqrt())
    for seed in range(3):
        u, s, v = truncated_svd(w64.float(), rank, SVDInit(kind="randomized", seed=seed))
        assert torch.all(s[:-1] >= s[1:])
        assert recon_error(w64, u, s, v) <= 1.01 * optimal
        # Singular vectors are only defined up to sign/rotation: compare the subspaces.
        assert min_cosine(q1[:, :rank], u) >= 0.95
        assert min_cosine(q2[:, :rank], v) >= 0.95


def test_oversampling_is_what_recovers_the_last_vectors() -> None:
    # performance.md §3.2: with q = r (PEFT's pissa_niter_N) the error is fine but the trailing vectors are wrong.
    sigma = power_law(120, 0.5)
    w64, q1, _ = planted(200, 120, sigma)
    w = w64.float()

    def sorted_cosines(oversample: int | None) -> list[float]:
        inits = [SVDInit("randomized", oversample=oversample, seed=seed) for seed in range(5)]
        return sorted(min_cosine(q1[:, :10], truncated_svd(w, 10, init)[0]) for init in inits)

    bare, default = sorted_cosines(0), sorted_cosines(None)
    assert bare[-1] < 0.9
    assert default[0] >= 0.95


def test_randomized_falls_back_to_exact_when_sketch_covers_matrix() -> None:
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(2))
    _, s_full, _ = truncated_svd(w, 25)
    _, s_rand, _ = truncated_svd(w, 25, RANDOMIZED)  # 25 + 12 >= 30: a sketch would save nothing
    torch.testing.assert_close(s_rand, s_full)


def test_energy_rank_golden_and_edges() -> None:
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.1, 0.01])
    assert energy_rank(s, 0.99) == 4
    assert energy_rank(s, 1.0) == 6
    assert energy_rank(s, 1e-9) == 1
    assert energy_rank(s.flip(0), 0.99) == 4  # order of the input does not matter
    assert energy_rank(s, 0.99, total_energy=float((s**2).sum())) == 4
    assert energy_rank(s, 0.99, total_energy=1e6) == 6  # partial spectrum never reaches: all supplied needed
    assert energy_rank(torch.tensor([1.0, 0.0, 0.0]), 1.0) == 1
    assert energy_rank(torch.zeros(4), 0.5) == 1
    assert energy_rank(torch.tensor([2.0]), 0.3) == 1


def test_elbow_rank_finds_planted_corner() -> None:
    # Steep linear drop over points 1..5, then a nearly flat tail: the corner is point 5.
    steep = torch.linspace(100.0, 20.0, 5)
    tail = torch.linspace(20.0, 15.0, 36)[1:]
    spectrum = torch.cat([steep, tail])
    assert elbow_rank(spectrum) == 5
    assert elbow_rank(spectrum[torch.randperm(spectrum.numel(), generator=torch.Generator().manual_seed(0))]) == 5
    # Step spectrum: the corner of the L is the first floor value (spec §2.5 combines elbow and energy by min()).
    assert elbow_rank(torch.tensor([10.0] * 4 + [1.0] * 20)) == 5
    assert elbow_rank(torch.ones(7)) == 7  # flat: no elbow, nothing negligible
    # no point below the chord (concave, a one-value floor, two values): no elbow either, K (not 1, which "min" with
    # the energy rank would turn into a single component)
    assert elbow_rank(torch.tensor([1.0, 1.0, 1.0, 0.999])) == 4
    assert elbow_rank(torch.tensor([10.0, 9.9, 9.8, 9.7, 9.6, 9.5, 9.4, 9.3, 0.5])) == 9
    assert elbow_rank(torch.tensor([4.0, 3.9, 3.0, 1.0])) == 4
    assert elbow_rank(torch.tensor([3.0])) == 1
    assert elbow_rank(torch.tensor([3.0, 1.0])) == 2
    # on the chord up to rounding (a straight spectrum; a geometric one on log scale): no elbow
    assert elbow_rank(torch.tensor([4.0, 3.0, 2.0, 1.0])) == 4
    assert elbow_rank(torch.linspace(1.0, 0.1, 10)) == 10
    log_geometric = 0.7 ** torch.arange(24, dtype=torch.float64)
    assert elbow_rank(log_geometric.log() - log_geometric.log().min()) == 24


@pytest.mark.parametrize("expected", [5, 23, 45])
def test_svd_by_energy_full_and_randomized_agree(expected: int) -> None:
    sigma = 0.95 ** torch.arange(120, dtype=torch.float64)  # r = 45 makes the randomized path grow 16 -> 32 -> 64
    w64, _, _ = planted(200, 120, sigma)
    frac = sigma.pow(2).cumsum(0) / sigma.pow(2).sum()
    # Threshold halfway between the energies of ranks expected-1 and expected: the answer is not on a boundary.
    threshold = float(frac[expected - 2] + frac[expected - 1]) / 2
    u_f, s_f, v_f = svd_by_energy(w64.float(), threshold)
    u_r, s_r, v_r = svd_by_energy(w64.float(), threshold, init=RANDOMIZED)
    assert s_f.numel() == s_r.numel() == expected
    assert u_r.shape == (200, expected) and v_r.shape == (120, expected)
    optimal = float(sigma[expected:].pow(2).sum().sqrt())
    assert recon_error(w64, u_r, s_r, v_r) <= 1.01 * optimal
    for init in (SVDInit(), RANDOMIZED):
        _, s_cap, _ = svd_by_energy(w64.float(), threshold, max_rank=expected // 2, init=init)
        assert s_cap.numel() == expected // 2
        assert svd_by_energy(w64.float(), threshold, max_rank=10_000, init=init)[1].numel() == expected


def test_svd_by_energy_threshold_one_keeps_full_rank() -> None:
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    for init in (SVDInit(), RANDOMIZED):
        assert svd_by_energy(w, 1.0, init=init)[1].numel() == 20


def test_energy_denominator_is_accurate_on_large_matrices() -> None:
    # fp32 torch.linalg.vector_norm is off by ~1e-4 relative at 4M elements on CPU: enough to move a τ=0.99 rank.
    from specpeft.init.svd import _frobenius_sq

    w = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(6))
    assert _frobenius_sq(w) == pytest.approx(float(w.double().pow(2).sum()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_input_is_upcast(dtype: torch.dtype) -> None:
    w = torch.randn(200, 120, generator=torch.Generator().manual_seed(4)).to(dtype)
    before = w.clone()
    w64 = w.double()
    ref = torch.linalg.svdvals(w64)
    for init in (SVDInit(), RANDOMIZED):
        u, s, v = truncated_svd(w, 8, init)
        assert u.dtype == s.dtype == v.dtype == torch.float32
        assert recon_error(w64, u, s, v) <= 1.01 * float(ref[8:].pow(2).sum().sqrt())
    assert w.dtype == dtype and torch.equal(w, before)


def test_non_contiguous_input_matches_its_copy() -> None:
    w = torch.randn(120, 200, generator=torch.Generator().manual_seed(7))
    for init in (SVDInit(), RANDOMIZED):
        _, s_view, _ = truncated_svd(w.T, 8, init)
        _, s_copy, _ = truncated_svd(w.T.contiguous(), 8, init)
        torch.testing.assert_close(s_view, s_copy, rtol=1e-5, atol=1e-6)


def test_randomized_is_reproducible_per_seed() -> None:
    w = torch.randn(200, 120, generator=torch.Generator().manual_seed(5))
    a = truncated_svd(w, 6, SVDInit("randomized", seed=11))
    b = truncated_svd(w, 6, SVDInit("randomized", seed=11))
    c = truncated_svd(w, 6, SVDInit("randomized", seed=12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: truncated_svd(torch.randn(3, 4, 5), 1), ["weight", "(3, 4, 5)"]),
        (lambda: truncated_svd(torch.randn(10), 1), ["weight", "(10,)"]),
        (lambda: truncated_svd(torch.ones(4, 4, dtype=torch.int64), 1), ["weight", "int64"]),
        (lambda: truncated_svd(torch.full((4, 4), float("nan")), 1), ["weight", "NaN"]),
        (lambda: truncated_svd(torch.randn(20, 12), 0), ["rank", "[1, 12]", "(20, 12)"]),
        (lambda: truncated_svd(torch.randn(20, 12), 13), ["rank", "[1, 12]"]),
        (lambda: truncated_svd(torch.randn(20, 12), 2.5), ["rank"]),
        (lambda: svd_by_energy(torch.randn(20, 12), 0.0), ["threshold", "(0, 1]"]),
        (lambda: svd_by_energy(torch.randn(20, 12), 1.5), ["threshold"]),
        (lambda: svd_by_energy(torch.randn(20, 12), 0.9, max_rank=0), ["max_rank"]),
        (lambda: energy_rank(torch.tensor([1.0]), float("nan")), ["threshold"]),
        (lambda: energy_rank(torch.tensor([1.0]), 0.5, total_energy=-1.0), ["total_energy"]),
        (lambda: energy_rank(torch.tensor([]), 0.5), ["singular_values"]),
        (lambda: elbow_rank(torch.ones(2, 2)), ["singular_values"]),
        (lambda: elbow_rank(torch.tensor([1.0, -1.0])), ["singular_values"]),
        (lambda: SVDInit(kind="lanczos"), ["kind", "randomized"]),  # type: ignore[arg-type]
        (lambda: SVDInit(oversample=-1), ["oversample"]),
        (lambda: SVDInit(niter=-2), ["niter"]),
        (lambda: SVDInit(seed=True), ["seed"]),
    ],
)
def test_errors_name_the_argument(call, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value)
