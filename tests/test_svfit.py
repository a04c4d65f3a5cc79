"""SVFit: spec self-checks (§1.10) against float64 references, and the foundation parameter matrix."""

import pytest
import torch

from adapter_matrix import CHECKS, MODEL_CASES, MethodCase, run_check
from specpeft import FrozenBase, LayerGeometry, SVDInit, SVFitConfig
from specpeft.adapters.svfit import SVFitAdapter

CASE = MethodCase(make_config=lambda targets: SVFitConfig(target_modules=targets), trainable={"s"})


@pytest.mark.parametrize("model_name", list(MODEL_CASES))
@pytest.mark.parametrize("check", list(CHECKS))
def test_matrix(check: str, model_name: str) -> None:
    run_check(check, CASE, model_name)


def _planted(sigmas: list[float], m: int = 12, n: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(sigmas), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sigmas), generator=gen, dtype=torch.float64))
    return (U * torch.tensor(sigmas, dtype=torch.float64)) @ V.T


def _adapter(weight: torch.Tensor, **cfg) -> SVFitAdapter:
    geometry = LayerGeometry("linear", tuple(weight.shape))
    return SVFitAdapter.create(geometry, SVFitConfig(target_modules=["x"], **cfg), weight, None, name="x")


def test_energy_rule_selects_rank_four() -> None:
    adapter = _adapter(_planted([5, 3, 2, 1, 0.1, 0.01]).float())
    assert adapter.rank == 4
    torch.testing.assert_close(adapter.sigma0, torch.tensor([5.0, 3.0, 2.0, 1.0]), atol=1e-5, rtol=0)


def test_merged_weight_is_paper_form() -> None:
    """W + U diag(s − σ⁰) Vᵀ equals the paper's W_e + U diag(s) Vᵀ (float64 reference)."""
    weight = _planted([4, 3, 2, 1, 0.5, 0.2]).float()
    adapter = _adapter(weight, r=3)
    with torch.no_grad():
        adapter.s.add_(torch.tensor([0.3, -0.2, 0.7]))
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    tail = (U[:, 3:] * S[3:]) @ Vh[3:]
    paper = tail + (adapter.U.double() * adapter.s.double()) @ adapter.V.double().T
    torch.testing.assert_close((weight.double() + adapter.delta_weight().double()), paper, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_forward_modes_agree_with_dense(mode: str) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(20, 30)
    adapter = SVFitAdapter.create(LayerGeometry.of(base), SVFitConfig(target_modules=["x"], r=6, forward_mode=mode),
                                  base.weight.detach(), None)
    with torch.no_grad():
        adapter.s.mul_(1.5)
    x = torch.randn(7, 20)
    expected = torch.nn.functional.linear(x, base.weight + adapter.delta_weight(), base.bias)
    torch.testing.assert_close(adapter(x, FrozenBase(base)), expected, atol=1e-5, rtol=1e-5)


def test_gradient_is_projected_weight_gradient() -> None:
    """∂L/∂s_i = u_iᵀ (∂L/∂W) v_i (spec §1.10 check 4)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 8).requires_grad_(False)
    adapter = SVFitAdapter.create(LayerGeometry.of(base), SVFitConfig(target_modules=["x"], r=5),
                                  base.weight.detach(), None)
    x = torch.randn(6, 10)
    adapter(x, FrozenBase(base)).pow(2).sum().backward()
    assert base.weight.grad is None
    weight = base.weight.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x, weight, base.bias).pow(2).sum().backward()
    expected = torch.einsum("oi,or,ir->r", weight.grad, adapter.U, adapter.V)
    torch.testing.assert_close(adapter.s.grad, expected, atol=1e-4, rtol=1e-4)


def test_randomized_svd_option_keeps_init_exact() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    cfg = SVFitConfig(target_modules=["x"], r=8, svd=SVDInit(kind="randomized"))
    adapter = SVFitAdapter.create(LayerGeometry.of(base), cfg, base.weight.detach(), None)
    x = torch.randn(3, 64)
    assert torch.equal(adapter(x, FrozenBase(base)), base(x))


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="energy_threshold"):
        SVFitConfig(target_modules=["x"], energy_threshold=1.5)
    with pytest.raises(TypeError, match="SVFitConfig.r"):
        SVFitConfig(target_modules=["x"], r="eight")
    with pytest.raises(ValueError, match="exceeds"):
        _adapter(torch.randn(4, 6), r=5)
