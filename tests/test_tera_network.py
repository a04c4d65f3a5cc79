"""TeRA's small network as one autograd node (specpeft/adapters/tera_network.py) against float64 references: the dense
Tucker Δ (`kernels.tucker_delta`, tensordot mode products) under autograd, and finite differences."""

from __future__ import annotations

import pytest
import torch

from specpeft import kernels
from specpeft.adapters.tera_network import kronecker_network, scaled_factor
from specpeft.init.tucker import TuckerShape

SHAPES = [  # (out_modes, in_modes, ranks): N = 2, 3, 4; rank-1 last mode (TeRA's default) and R_N = 2
    ((4, 3), (2, 5), (3, 1)),
    ((2, 3, 2), (3, 2, 2), (2, 3, 1)),
    ((2, 3, 2), (3, 2, 2), (2, 2, 2)),
    ((2, 2, 2, 3), (2, 1, 3, 2), (2, 2, 3, 1)),
]


def _network_inputs(shape: TuckerShape, sides: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *size: torch.randn(*size, generator=gen, dtype=torch.float64)  # noqa: E731
    core = rand(*shape.ranks)
    factors = [rand(j, r) for j, r in zip(shape.mode_sizes, shape.ranks)]
    lams = [(1 + 0.5 * rand(j)).requires_grad_(True) for j in shape.mode_sizes] if sides != "rank" else []
    mus = [(1 + 0.5 * rand(r)).requires_grad_(True) for r in shape.ranks] if sides != "mode" else []
    return core, factors, lams, mus


@pytest.mark.parametrize("modes", SHAPES)
@pytest.mark.parametrize("sides", ["both", "mode", "rank"])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_network_equals_the_dense_tucker_delta_and_its_gradients(modes, sides: str, alpha: float) -> None:
    """Σ_r A_r ⊗ B_r = α·unfold(𝒢 ×_k Ũ_k) and, for a random upstream G, the diagonals' gradients of <G, Δ> equal
    autograd through the dense Δ (float64)."""
    shape = TuckerShape(*modes)
    core, factors, lams, mus = _network_inputs(shape, sides)
    A, B = kronecker_network(shape, core, factors, lams, mus, alpha=alpha)
    delta = sum(torch.kron(A[r], B[r]) for r in range(A.shape[0]))  # (m, n)
    none = [None] * shape.order
    scaled = [scaled_factor(f, lam, mu) for f, lam, mu in zip(factors, lams or none, mus or none)]
    reference = kernels.tucker_delta(alpha * core, scaled, shape.out_modes, shape.in_modes)
    torch.testing.assert_close(delta, reference, atol=1e-12, rtol=0)
    upstream = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vectors = lams + mus
    got = torch.autograd.grad((delta * upstream).sum(), vectors)
    want = torch.autograd.grad((reference * upstream).sum(), vectors)
    for g, w in zip(got, want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("modes", SHAPES[1:3])
@pytest.mark.parametrize("sides", ["both", "rank"])
def test_network_gradcheck(modes, sides: str) -> None:
    """Finite differences through both outputs, one of them unused in part of the checks (zero gradient path)."""
    shape = TuckerShape(*modes)
    core, factors, lams, mus = _network_inputs(shape, sides, seed=3)
    n_lams = len(lams)

    def both(*vectors: torch.Tensor):
        return kronecker_network(shape, core, factors, list(vectors[:n_lams]), list(vectors[n_lams:]), alpha=0.8)

    assert torch.autograd.gradcheck(both, (*lams, *mus))
    assert torch.autograd.gradcheck(lambda *v: both(*v)[0], (*lams, *mus))
    assert torch.autograd.gradcheck(lambda *v: both(*v)[1], (*lams, *mus))
