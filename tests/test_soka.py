"""SoKA: spec self-checks (§2.11) against float64 dense references, and the foundation parameter matrix."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from triton_guard import DEVICE, interpreter_child_test, needs_triton  # noqa: I001

import specpeft
import specpeft.kernels as K
from adapter_matrix import CHECKS, MODEL_CASES, MethodCase, ModelCase, adapted, run_check
from specpeft import FrozenBase, LayerGeometry, SoKAConfig, SVDInit
from specpeft.adapters import soka_function
from specpeft.kernels import kronecker_torch
from specpeft.adapters.soka import SoKAAdapter
from specpeft.init.kronecker import allocate_budget

# max_rank=4: the matrix runs several stacked components per layer (the default clamp of 1 is one of them)
CASE = MethodCase(make_config=lambda targets: SoKAConfig(target_modules=targets, max_rank=4), trainable={"A", "B"})
F64 = torch.float64


class PrimeMLP(nn.Module):
    """Prime dims: W (7×11) and (13×7) have no qualifying split, so both are zero-padded (spec §2.4)."""

    def __init__(self) -> None:
        super().__init__()
        self.p0 = nn.Linear(11, 7)
        self.p1 = nn.Linear(7, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p1(torch.tanh(self.p0(x)))


PRIME_CASE = ModelCase(PrimeMLP, lambda: {"x": torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(9))},
                       ["p0", "p1"])


@pytest.mark.parametrize("model_name", list(MODEL_CASES))
@pytest.mark.parametrize("check", list(CHECKS))
def test_matrix(check: str, model_name: str) -> None:
    run_check(check, CASE, model_name)


@pytest.mark.parametrize("check", list(CHECKS))
def test_matrix_prime_dims(check: str) -> None:
    records = specpeft.get_adapter_model(PRIME_CASE.model(), CASE.make_config(["p0", "p1"])).peft_config["default"]
    assert all(rec["padding"] != [0, 0] for rec in records.layer_records.values())
    CHECKS[check](PRIME_CASE, CASE)


# -- helpers ----------------------------------------------------------------------------------------------------


def _linear(d_in: int, d_out: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def _adapter(base: nn.Linear, **cfg) -> SoKAAdapter:
    config = SoKAConfig(target_modules=["x"], **cfg)
    return SoKAAdapter.create(LayerGeometry.of(base), config, base.weight.detach(), None, name="x")


def _perturb(adapter: SoKAAdapter, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.A.add_(scale * torch.randn(adapter.A.shape, generator=g))
        adapter.B.add_(scale * torch.randn(adapter.B.shape, generator=g))


def _dense_delta(adapter: SoKAAdapter) -> torch.Tensor:
    """Float64 reference: crop(Σ_k A_k⊗B_k − Σ_k A⁰_k⊗B⁰_k) from torch.kron, term by term."""
    d_out, d_in = adapter.geometry.matrix_shape
    total = sum(torch.kron(a.double(), b.double()) - torch.kron(a0.double(), b0.double())
                for a, b, a0, b0 in zip(adapter.A, adapter.B, adapter.A0, adapter.B0))
    return total[:d_out, :d_in]


# -- parameterization -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [(20, 30), (11, 7), (7, 13)])
def test_init_is_the_papers_residual_form(dims: tuple[int, int]) -> None:
    base = _linear(*dims)
    adapter = _adapter(base, r=3)
    w = base.weight.detach().double()
    initial = sum(torch.kron(a.double(), b.double()) for a, b in zip(adapter.A0, adapter.B0))
    w_res = w - initial[: dims[1], : dims[0]]  # (d_out, d_in) crop of the padded Kronecker sum
    # captured energy = 1 − ‖W_res‖²/‖W‖² (KPSVD optimality makes the residual the tail energy); for a zero-padded
    # layer the KPSVD also fits the padding, which the crop drops, so the recorded value is a lower bound
    energy, cropped = adapter.record()["energy"], 1 - float(w_res.pow(2).sum() / w.pow(2).sum())
    if adapter.shape.padding == (0, 0):
        assert energy == pytest.approx(cropped, abs=1e-5)
    else:
        assert 0 < energy <= cropped + 1e-6
    assert torch.equal(adapter.delta_weight(), torch.zeros_like(base.weight))
    _perturb(adapter)
    paper = w_res + sum(torch.kron(a.double(), b.double()) for a, b in zip(adapter.A, adapter.B))[: dims[1], : dims[0]]
    torch.testing.assert_close(w + adapter.delta_weight().double(), paper, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dims", [(24, 40), (11, 7), (7, 13)])
def test_factored_forward_equals_dense_float64(dims: tuple[int, int]) -> None:
    base = _linear(*dims).double()
    adapter = _adapter(base, r=4).double()
    _perturb(adapter)
    x = torch.randn(3, 5, dims[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    expected = F.linear(x, base.weight + _dense_delta(adapter), base.bias)
    torch.testing.assert_close(adapter(x, FrozenBase(base)), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(adapter.delta_forward(x, FrozenBase(base)), x @ _dense_delta(adapter).T,
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(adapter.delta_weight().double(), _dense_delta(adapter), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dims", [(24, 40), (20, 30), (11, 7)])  # A first, B first, zero-padded (A first)
@pytest.mark.parametrize("chunks", ["one", "ragged"])
def test_gradients_equal_dense_reference(dims: tuple[int, int], chunks: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _linear(*dims).double().requires_grad_(False)
    adapter = _adapter(base, r=3).double()
    _perturb(adapter)
    if chunks == "ragged":  # 3 tokens per chunk over 10 tokens: chunks of 3, 3, 3, 1
        monkeypatch.setitem(kronecker_torch._CHUNK_ELEMENTS, "cpu", 3 * _chunk_width(adapter))
    x = torch.randn(2, 5, dims[0], dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    adapter(x, FrozenBase(base)).sin().sum().backward()
    got = (adapter.A.grad.clone(), adapter.B.grad.clone(), x.grad.clone())
    adapter.zero_grad()
    x.grad = None
    F.linear(x, base.weight + _dense_delta(adapter), base.bias).sin().sum().backward()
    for a, b in zip(got, (adapter.A.grad, adapter.B.grad, x.grad)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _chunk_width(adapter: SoKAAdapter) -> int:
    """Stage-1 elements per token of the factored product: n1·2r·m2 (B first) or n2·2r·m1 (A first)."""
    (m1, n1), (m2, n2) = adapter.shape.a_shape, adapter.shape.b_shape
    first = soka_function.b_first(adapter.shape.a_shape, adapter.shape.b_shape)
    return 2 * adapter.rank * (n1 * m2 if first else n2 * m1)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("dims", [(24, 40), (20, 30)])  # A first, B first
def test_bf16_forward_and_gradients(dims: tuple[int, int]) -> None:
    """bf16 activations with fp32 factors: output and x/A/B gradients within 1e-2 of the float64 dense product."""
    base = _linear(*dims).requires_grad_(False)
    adapter = _adapter(base, r=3)
    _perturb(adapter, scale=0.3)
    x = torch.randn(4, 3, dims[0], generator=torch.Generator().manual_seed(6))
    grad = torch.randn(4, 3, dims[1], generator=torch.Generator().manual_seed(7))
    x16 = x.bfloat16().requires_grad_(True)
    y16 = adapter.delta_forward(x16, FrozenBase(base.bfloat16()))
    assert y16.dtype == torch.bfloat16
    got = torch.autograd.grad(y16, [x16, adapter.A, adapter.B], grad.bfloat16())
    assert got[1].dtype == got[2].dtype == torch.float32
    x64 = x16.detach().double().requires_grad_(True)
    A, B = adapter.A.detach().double().requires_grad_(True), adapter.B.detach().double().requires_grad_(True)
    initial = sum(torch.kron(a0, b0) for a0, b0 in zip(adapter.A0.double(), adapter.B0.double()))
    y64 = x64 @ (sum(torch.kron(a, b) for a, b in zip(A, B)) - initial)[: dims[1], : dims[0]].T
    expected = torch.autograd.grad(y64, [x64, A, B], grad.double())
    assert _rel_err(y16, y64) <= 1e-2
    for g, g_ref in zip(got, expected):
        assert _rel_err(g, g_ref) <= 1e-2


def test_prime_4099x4096_layer() -> None:
    base = _linear(4096, 4099).requires_grad_(False)
    adapter = _adapter(base, r=1, svd=SVDInit(kind="randomized", niter=1))
    assert adapter.record()["padding"] == [61, 0] and adapter.record()["b_shape"] == [65, 64]
    x = torch.randn(4, 4096, generator=torch.Generator().manual_seed(4))
    assert torch.equal(adapter(x, FrozenBase(base)), base(x))  # exact at init
    _perturb(adapter, scale=0.01)
    delta = _dense_delta(adapter)
    torch.testing.assert_close(adapter.delta_forward(x, FrozenBase(base)).double(), x.double() @ delta.T,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adapter.delta_weight().double(), delta, atol=1e-6, rtol=0)


# -- rank selection ---------------------------------------------------------------------------------------------


def test_rank_selection_finds_planted_components() -> None:
    g = torch.Generator().manual_seed(5)
    q_a = torch.linalg.qr(torch.randn(16, 3, generator=g)).Q  # orthonormal vec(A_k): σ(R(W)) = 3, 2, 1.5 exactly
    q_b = torch.linalg.qr(torch.randn(16, 3, generator=g)).Q
    w = sum(s * torch.kron(q_a[:, k].reshape(4, 4), q_b[:, k].reshape(4, 4)) for k, s in enumerate((3.0, 2.0, 1.5)))
    w = w + 1e-4 * torch.randn(16, 16, generator=g)
    base = nn.Linear(16, 16)
    with torch.no_grad():
        base.weight.copy_(w)
    adapter = _adapter(base, max_rank=None)  # min(energy 90 %, elbow), unclamped
    record = adapter.record()
    assert record["r"] == 3 and record["a_shape"] == [4, 4] and record["b_shape"] == [4, 4]
    assert record["padding"] == [0, 0] and record["energy"] > 0.9999
    assert (record["rank_energy"], record["rank_elbow"]) == (3, 4)  # τ = 0.9 needs all 3; the knee is the 4th
    torch.testing.assert_close(torch.tensor(record["sigma"]), torch.tensor([3.0, 2.0, 1.5]), atol=2e-3, rtol=0)
    assert _adapter(base, rank_rule="elbow", max_rank=None).rank == 4  # Kneedle's corner: first negligible one
    assert _adapter(base, max_rank=2).rank == 2
    assert _adapter(base).rank == 1  # the default clamp: the paper's one component per matrix


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 32)
        self.c = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_global_param_budget() -> None:
    torch.manual_seed(0)
    free = specpeft.get_adapter_model(ThreeLayers(), SoKAConfig(target_modules=["a", "b", "c"], max_rank=None))
    free_records = free.peft_config["default"].layer_records
    budget = 200
    torch.manual_seed(0)
    model = specpeft.get_adapter_model(ThreeLayers(), SoKAConfig(target_modules=["a", "b", "c"], max_rank=None,
                                                                 param_budget=budget))
    records = model.peft_config["default"].layer_records
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable <= budget < sum(r["r"] * _cost(r) for r in free_records.values())
    # the ranks are the greedy allocation over each layer's rule-selected components
    keys = ["a", "b", "c"]
    expected = allocate_budget([torch.tensor(free_records[k]["sigma"]) for k in keys],
                               [free_records[k]["total_energy"] for k in keys],
                               [_cost(free_records[k]) for k in keys], budget)
    assert [records[k]["r"] for k in keys] == expected
    for name, layer in adapted(model):
        assert layer.adapters["default"].rank == records[name.removeprefix("base_model.model.")]["r"]
    x = torch.randn(4, 16)
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), ThreeLayers()(x), atol=0, rtol=0)  # still exact at init
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    out = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        torch.manual_seed(0)
        reloaded = specpeft.load_adapter_model(ThreeLayers(), tmp)
        torch.testing.assert_close(reloaded(x), out, atol=0, rtol=0)


def _cost(record: dict) -> int:
    (m1, n1), (m2, n2) = record["a_shape"], record["b_shape"]
    return m1 * n1 + m2 * n2


def test_zero_weight_warns() -> None:
    base = nn.Linear(8, 8)
    with torch.no_grad():
        base.weight.zero_()
    with pytest.warns(UserWarning, match="no gradient"):
        _adapter(base, r=1)


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="energy_threshold"):
        SoKAConfig(target_modules=["x"], energy_threshold=0.0)
    with pytest.raises(ValueError, match="param_budget"):
        SoKAConfig(target_modules=["x"], param_budget=0)
    with pytest.raises(ValueError, match="param_budget=100 has no effect with max_rank=1.*max_rank=None"):
        SoKAConfig(target_modules=["x"], param_budget=100)  # the default max_rank would clamp every layer to 1
    SoKAConfig(target_modules=["x"], r=2, param_budget=100)  # fixed ranks: the budget can drop components
    with pytest.raises(TypeError, match="rank_rule"):
        SoKAConfig(target_modules=["x"], rank_rule="median")
    with pytest.raises(ValueError, match="exceeds"):
        _adapter(_linear(4, 4), r=5)
    with pytest.raises(ValueError, match="param_budget=10"):
        specpeft.get_adapter_model(ThreeLayers(), SoKAConfig(target_modules=["a", "b", "c"], param_budget=10))


# -- Triton path (issue 9): the adapter runs kernels.kronecker_linear; checked in the Triton interpreter on CPU ------


test_triton_path_in_child_process = interpreter_child_test(__file__, select="triton")


class KernelMLP(nn.Module):
    """Layers on both contraction orders and a zero-padded one, none a multiple of the interpreter's 16-wide blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.b_first = nn.Linear(20, 30)  # (6, 4)⊗(5, 5)
        self.a_first = nn.Linear(30, 7)  # (1, 3)⊗(7, 10)
        self.padded = nn.Linear(7, 13)  # (2, 2)⊗(7, 4), one padded row and column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.padded(torch.tanh(self.a_first(torch.tanh(self.b_first(x)))))


def _kernel_run(backend: str, state: dict | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Output and gradients (x, then A and B of every layer) of a perturbed SoKA KernelMLP in fp32."""
    torch.manual_seed(0)
    model = specpeft.get_adapter_model(KernelMLP().to(DEVICE), SoKAConfig(
        target_modules=["b_first", "a_first", "padded"], r=2, kernel_backend=backend))
    if state is None:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(DEVICE))
    else:
        model.load_state_dict(state)
    x = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_(True)
    y = model(x)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    names, factors = zip(*[(name, p) for name, p in model.named_parameters() if p.requires_grad])
    assert len(factors) == 6
    return model, dict(zip(["y", "x", *names], [y, *torch.autograd.grad(y, [x, *factors], grad)]))


@needs_triton
def test_triton_backend_runs_the_kronecker_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = K.kronecker_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(K, "kronecker_linear", counting)
    monkeypatch.setenv(K.ENV_VAR, "torch")  # the config flag beats the environment, both ways
    model, fused = _kernel_run("triton")
    assert calls == ["triton"] * 3
    monkeypatch.setenv(K.ENV_VAR, "triton")
    _, eager = _kernel_run("torch", state=model.state_dict())
    assert calls == ["triton"] * 3, "kernel_backend='torch' must never call the Triton kernel"
    assert fused.keys() == eager.keys() and len(fused) == 8
    for name, expected in eager.items():
        assert expected.norm() > 0, name
        assert _rel_err(fused[name], expected) <= 1e-5, f"{name}: {_rel_err(fused[name], expected):.2e}"


def test_delta_of_a_float64_adapter_is_float64() -> None:
    """After model.double(), ΔW = Σ A_k⊗B_k − Σ A⁰_k⊗B⁰_k is built in fp64 (an fp32 build is off by ~1e-7)."""
    torch.manual_seed(0)
    model = specpeft.get_adapter_model(PrimeMLP(), SoKAConfig(target_modules=["p0", "p1"], r=2)).double()
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.data.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
    for _, layer in adapted(model):
        adapter = layer.adapters["default"]
        d_out, d_in = layer.geometry.matrix_shape
        reference = sum(torch.kron(a, b) for a, b in zip(adapter.A, adapter.B)) - sum(
            torch.kron(a, b) for a, b in zip(adapter.A0, adapter.B0))  # fp64 (m1·m2, n1·n2), padded
        delta = adapter.delta_weight()
        assert delta.dtype == F64
        torch.testing.assert_close(delta, reference[:d_out, :d_in], atol=1e-14, rtol=0)


def test_a_too_large_rank_names_the_option_that_set_it() -> None:
    with pytest.raises(ValueError, match=r"set by SoKAConfig.rank_pattern\['p0'\]"):
        specpeft.get_adapter_model(PrimeMLP(), SoKAConfig(target_modules=["p0", "p1"], rank_pattern={"p0": 99}))
    with pytest.raises(ValueError, match=r"set by SoKAConfig.r\."):
        specpeft.get_adapter_model(PrimeMLP(), SoKAConfig(target_modules=["p0", "p1"], r=99))
