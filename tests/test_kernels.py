"""Kernels (specpeft/kernels): every Triton op against its torch reference, forward and every input gradient.

Without a GPU the Triton kernels run in the Triton interpreter on CPU tensors; on a CUDA machine the same tests run
the compiled kernels on CUDA tensors (`triton_guard` sets the interpreter up, or re-runs these tests in a child
process when triton was imported in compiled mode first).

The oracle is the op's `*_reference` evaluated in float64 on the same input values (itself checked against
independent dense formulas below). Tolerances are the relative-norm bounds of performance.md (M8):
‖kernel − reference‖ / ‖reference‖ ≤ 1e-5 in fp32, ≤ 1e-2 in bf16. Shapes are tiny and deliberately not multiples
of the block sizes (16 in the interpreter).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from triton_guard import CUDA, DEVICE, RUNNABLE, interpreter_child_test, needs_cuda, needs_triton  # noqa: I001

import specpeft.kernels as K
from specpeft.kernels import _dispatch

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # performance.md, M8
test_interpreter_tests_in_child_process = interpreter_child_test(__file__)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def compare(kernel_fn, reference_fn, inputs: dict, dtype: torch.dtype) -> None:
    """Kernel on `inputs` vs the reference on float64 copies: output and the gradient of every input needing one."""
    wants = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    y = kernel_fn(**inputs)
    assert y.dtype == inputs["x"].dtype
    oracle_inputs = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                     for k, v in inputs.items()}
    y_ref = reference_fn(**oracle_inputs)
    assert rel_err(y, y_ref) <= TOL[dtype], f"forward: {rel_err(y, y_ref):.2e}"
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [inputs[k] for k in wants], grad_out)
    grads_ref = torch.autograd.grad(y_ref, [oracle_inputs[k] for k in wants], grad_out.double())
    for name, g, g_ref in zip(wants, grads, grads_ref):
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, name
        assert g_ref.norm() > 0, name
        assert rel_err(g, g_ref) <= TOL[dtype], f"grad {name}: {rel_err(g, g_ref):.2e}"


def tensor(*shape: int, dtype=torch.float32, grad: bool = True, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return t.to(device=DEVICE, dtype=dtype).requires_grad_(grad)


# -- low-rank ---------------------------------------------------------------------------------------------------


def cases(shapes: list, bf16: list) -> list:
    """Every shape in fp32, the listed ones also in bf16 (the interpreter is slow: the bf16 path shares its code)."""
    return [pytest.param(s, torch.float32, id=f"{s}-fp32") for s in shapes] + \
        [pytest.param(s, torch.bfloat16, id=f"{s}-bf16") for s in bf16]


@needs_triton
@pytest.mark.parametrize("shape, dtype", cases([(17, 20, 29, 5), (9, 16, 24, 17)], bf16=[(17, 20, 29, 5)]))
def test_lowrank_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    T, k, n, r = shape
    inputs = dict(x=tensor(1, T, k, dtype=dtype, seed=1), down=tensor(k, r, seed=2, scale=0.3),
                  scale=tensor(r, seed=3), up=tensor(n, r, seed=4, scale=0.3),
                  weight=tensor(n, k, dtype=dtype, seed=5, scale=0.2, grad=r > 8), bias=tensor(n, dtype=dtype, seed=6))
    compare(lambda **a: K.lowrank_linear(**a, backend="triton"), K.lowrank_linear_reference, inputs, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_delta_with_base_out(dtype: torch.dtype) -> None:
    inputs = dict(x=tensor(10, 18, dtype=dtype, seed=1), down=tensor(18, 3, seed=2), scale=tensor(3, seed=3),
                  up=tensor(20, 3, seed=4), base_out=tensor(10, 20, dtype=dtype, seed=5))
    compare(lambda **a: K.lowrank_linear(**a, backend="triton"), K.lowrank_linear_reference, inputs, dtype)


@needs_triton
def test_lowrank_svfit_case_saves_no_activation() -> None:
    """Frozen W, V, U (SVFit): only the (T, r) projection is saved, not x (T, k); ds is exact at s = 0."""
    T, k, n, r = 25, 18, 20, 3
    x = tensor(T, k, seed=1)
    down, up, weight = tensor(k, r, grad=False, seed=2), tensor(n, r, grad=False, seed=3), tensor(n, k, grad=False)
    scale = torch.zeros(r, device=DEVICE, requires_grad=True)  # SVFit at init: s − σ⁰ = 0
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = K.lowrank_linear(x, down, scale, up, weight=weight, backend="triton")
    shapes = [tuple(t.shape) for t in saved]
    assert (T, k) not in shapes and (T, r) in shapes, shapes
    grad_s, = torch.autograd.grad(y.sum(), scale)
    ones = torch.ones(T, n, device=DEVICE, dtype=torch.float64)
    expected = ((x.double() @ down.double()) * (ones @ up.double())).sum(0)  # Σ_t (xV)_t ⊙ (1 U)_t
    assert rel_err(grad_s, expected) <= 1e-5


@needs_triton
def test_svfit_factored_forward_runs_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """SVFit's factored path calls `lowrank_linear` when the kernels dispatch to Triton, with the eager outputs."""
    from specpeft import FrozenBase, LayerGeometry, SVFitConfig
    from specpeft.adapters.svfit import SVFitAdapter

    torch.manual_seed(0)
    base = torch.nn.Linear(20, 18).to(DEVICE).requires_grad_(False)
    config = SVFitConfig(target_modules=["x"], r=4, forward_mode="factored")
    adapter = SVFitAdapter.create(LayerGeometry.of(base), config, base.weight, None).to(DEVICE)
    with torch.no_grad():
        adapter.s.mul_(1.3)
    x = tensor(5, 20)
    calls = []
    monkeypatch.setattr(K, "lowrank_linear", lambda *a, **kw: calls.append(1) or K.lowrank.lowrank_linear(*a, **kw))
    outputs = {}
    for backend in ("torch", "triton"):
        with K.use_kernel_backend(backend):
            y = adapter(x, FrozenBase(base))
            outputs[backend] = (y, *torch.autograd.grad(y.square().sum(), (x, adapter.s)))
    assert calls == [1]
    for fused, eager in zip(outputs["triton"], outputs["torch"]):
        assert rel_err(fused, eager) <= TOL[torch.float32]


# -- Kronecker --------------------------------------------------------------------------------------------------

KRON_SHAPES = [  # (R, m1, n1, m2, n2, d_in, d_out): B-first, A-first, and SoKA-style zero padding
    (2, 3, 4, 5, 3, 12, 15),
    (3, 5, 2, 3, 7, 14, 15),
    (1, 17, 3, 2, 18, 50, 33),
]


@needs_triton
@pytest.mark.parametrize("shape, dtype", cases(KRON_SHAPES, bf16=KRON_SHAPES[2:]))
def test_kronecker_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    R, m1, n1, m2, n2, d_in, d_out = shape
    inputs = dict(x=tensor(3, d_in, dtype=dtype, seed=1), A=tensor(R, m1, n1, seed=2), B=tensor(R, m2, n2, seed=3),
                  base_out=tensor(3, d_out, dtype=dtype, seed=4), out_features=d_out)
    compare(lambda **a: K.kronecker_linear(**a, backend="triton"), K.kronecker_linear_reference, inputs, dtype)


# -- Tucker / TeRA ----------------------------------------------------------------------------------------------

TUCKER_SHAPES = [((2, 3, 2), (3, 2, 2), (2, 3, 2)), ((5, 3), (2, 7), (3, 4))]  # (out_modes, in_modes, ranks)


def _tucker_inputs(out_modes, in_modes, ranks, dtype, with_weight: bool) -> dict:
    m, n = math.prod(out_modes), math.prod(in_modes)
    factors = [tensor(a * b, r, seed=10 + i) for i, (a, b, r) in enumerate(zip(out_modes, in_modes, ranks))]
    return dict(x=tensor(2, 2, n, dtype=dtype, seed=1), core=tensor(*ranks, seed=2), factors=factors,
                out_modes=out_modes, in_modes=in_modes,
                weight=tensor(m, n, dtype=dtype, seed=3, grad=False) if with_weight else None,
                bias=tensor(m, dtype=dtype, seed=4) if with_weight else None)


TUCKER_CASES = [  # the factored mode runs the Kronecker kernel, whose bf16 path is tested above
    pytest.param(TUCKER_SHAPES[0], "materialized", torch.float32, id="order3-materialized-fp32"),
    pytest.param(TUCKER_SHAPES[1], "materialized", torch.float32, id="order2-materialized-fp32"),
    pytest.param(TUCKER_SHAPES[0], "factored", torch.float32, id="order3-factored-fp32"),
    pytest.param(TUCKER_SHAPES[1], "factored", torch.float32, id="order2-factored-fp32"),
    pytest.param(TUCKER_SHAPES[0], "materialized", torch.bfloat16, id="order3-materialized-bf16"),
]


@needs_triton
@pytest.mark.parametrize("shape, mode, dtype", TUCKER_CASES)
def test_tucker_matches_reference(shape, mode: str, dtype: torch.dtype) -> None:
    inputs = _tucker_inputs(*shape, dtype, with_weight=shape[0] == (2, 3, 2))

    def kernel(factors, **a):
        return K.tucker_linear(factors=factors, **a, mode=mode, backend="triton")

    def reference(factors, **a):
        return K.tucker_linear_reference(factors=factors, **a)

    # the factor list is flattened so that `compare` sees (and differentiates) every factor
    flat = {k: v for k, v in inputs.items() if k != "factors"}
    flat.update({f"factor{i}": f for i, f in enumerate(inputs["factors"])})
    order = len(inputs["factors"])
    unpack = lambda f: lambda **a: f(factors=[a.pop(f"factor{i}") for i in range(order)], **a)  # noqa: E731
    compare(unpack(kernel), unpack(reference), flat, dtype)


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_tucker_base_out_is_added_to_the_adapter_term(mode: str) -> None:
    """base_out (a base with no plain weight, e.g. quantized) is added to x Δᵀ on the torch path, in float64."""
    inputs = _tucker_inputs((2, 3, 2), (3, 2, 2), (2, 3, 1), torch.float64, with_weight=False)
    inputs["core"], inputs["factors"] = inputs["core"].double(), [f.double() for f in inputs["factors"]]
    base_out = tensor(2, 2, 12, dtype=torch.float64, seed=5)
    got = K.tucker_linear(**inputs, base_out=base_out, mode=mode, backend="torch")
    torch.testing.assert_close(got, base_out + K.tucker_linear_reference(**inputs), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="base_out"):
        K.tucker_linear(**{**inputs, "bias": tensor(12, seed=6)}, base_out=base_out, backend="torch")


@needs_triton
def test_tucker_materialized_saves_no_weight_sized_tensor() -> None:
    """W + Δ is rebuilt in backward: autograd keeps no new (m, n) tensor (the base weight itself is only referenced)."""
    inputs = _tucker_inputs((2, 3, 2), (3, 2, 2), (2, 3, 2), torch.float32, with_weight=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        K.tucker_linear(**inputs, mode="materialized", backend="triton")
    weight = inputs["weight"]
    big = [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()]
    assert not big, [tuple(t.shape) for t in big]


def test_tucker_break_even_rule() -> None:
    """Spec §1.6: with R = 16 on 4096² materializing wins at training batch sizes; tiny ranks and T = 1 factor."""
    modes = ((16, 16, 16), (16, 16, 16))
    assert not K.tucker_prefers_factored(4096, (16, 16, 16), *modes, has_weight=True, training=True)
    assert K.tucker_prefers_factored(1, (2, 2, 2), *modes, has_weight=True, training=False)


# -- SNELLA -----------------------------------------------------------------------------------------------------


def _robust_tau(kernel: torch.Tensor, fraction: float) -> float:
    """A threshold near the `fraction` quantile of |K| in the middle of its widest local gap, so that fp32 rounding
    differences between kernel and reference cannot flip an entry of the mask."""
    values = kernel.detach().abs().flatten().sort().values
    k = int(fraction * values.numel())
    window = values[k - 4:k + 5]
    i = int((window[1:] - window[:-1]).argmax())
    return float((window[i] + window[i + 1]) / 2)


SNELLA_CASES = [  # (kernel, mask_mode, materialize, with_weight, dΔ from a dense GEMM rather than in-kernel)
    ("snella", "code", False, True, False),
    ("snell", "binary", False, False, False),
    ("snella", "binary", True, True, True),
]


@needs_triton
@pytest.mark.parametrize("case, dtype", cases(SNELLA_CASES, bf16=SNELLA_CASES[::2]))
def test_snella_matches_reference(case, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, mask_mode, materialize, with_weight, dense_grad = case
    monkeypatch.setattr(K.snella, "DENSE_GRAD_MIN_TOKENS", 0 if dense_grad else 1 << 30)
    H, n, m, r, T = 2, 18, 21, 3, 7
    uniform = lambda *s, seed: (torch.rand(*s, generator=torch.Generator().manual_seed(seed)) - 0.5).to(DEVICE)  # noqa
    inputs = dict(x=tensor(T, n, dtype=dtype, seed=1), in_qs=uniform(H, n, r, seed=2).requires_grad_(),
                  out_qs=uniform(H, m, r, seed=3).requires_grad_(), scale=tensor(seed=4),
                  weight=tensor(m, n, dtype=dtype, seed=5, grad=with_weight) if with_weight else None,
                  bias=tensor(m, dtype=dtype, seed=6) if with_weight else None, kernel=kernel, mask_mode=mask_mode)
    if kernel == "snella":
        inputs.update(alpha=torch.tensor(0.7, device=DEVICE, requires_grad=True),
                      gamma=torch.tensor(0.3, device=DEVICE, requires_grad=True),
                      beta=torch.tensor(0.05, device=DEVICE, requires_grad=True))
    scalars = {k: inputs.get(k) for k in ("alpha", "gamma", "beta")}
    full = K.snella_kernel_matrix(inputs["in_qs"].double(), inputs["out_qs"].double(),
                                  *[None if v is None else v.double() for v in scalars.values()], kernel=kernel)
    inputs["tau"] = _robust_tau(full, 0.4)
    compare(lambda **a: K.snella_linear(**a, materialize=materialize, backend="triton"), K.snella_linear_reference,
            inputs, dtype)


@needs_triton
def test_snella_saves_no_kernel_matrix() -> None:
    """Backward recomputes K: autograd keeps only x, the factors, the scalars and 2n column statistics."""
    H, n, m, r = 2, 18, 21, 3
    inputs = dict(x=tensor(7, n), in_qs=tensor(H, n, r, scale=0.3), out_qs=tensor(H, m, r, scale=0.3),
                  scale=tensor(), alpha=tensor(), gamma=tensor().detach().abs().requires_grad_(), beta=tensor())
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        K.snella_linear(**inputs, tau=0.1, backend="triton")
    assert max(t.numel() for t in saved) < m * n


# -- references against independent dense formulas (float64, no Triton) ----------------------------------------


def _grads_of(fn, inputs: dict, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn(**inputs), under bf16 autocast or not, with backward outside it (PyTorch's AMP recipe): output and the
    gradients of every input that requires one."""
    wants = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = fn(**inputs)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device)
    return y, list(torch.autograd.grad(y.float(), [inputs[k] for k in wants], grad_out))


@needs_triton
@pytest.mark.parametrize("op", ["tucker", "snella"])
def test_materialized_kernels_train_under_autocast(op: str) -> None:
    """The materialized Tucker and SNELLA ops under bf16 autocast on fp32 inputs (a residual stream), backward called
    outside autocast: they compute what they compute for x cast to bf16 (as autocast's own F.linear would), the
    gradients land in the inputs' fp32, and the output is within bf16 accuracy of the float64 reference."""
    if op == "tucker":
        inputs = _tucker_inputs(*TUCKER_SHAPES[0], torch.float32, with_weight=True)
        factors = inputs.pop("factors")
        order = len(factors)
        inputs.update({f"factor{i}": f for i, f in enumerate(factors)})
        run = lambda fn: lambda **a: fn(factors=[a.pop(f"factor{i}") for i in range(order)], **a)  # noqa: E731
        kernel = run(lambda **a: K.tucker_linear(**a, mode="materialized", backend="triton"))
        reference = run(K.tucker_linear_reference)
    else:
        H, n, m, r, T = 2, 18, 21, 3, 7
        uniform = lambda *s, seed: (torch.rand(*s, generator=torch.Generator().manual_seed(seed)) - 0.5).to(DEVICE)  # noqa
        inputs = dict(x=tensor(T, n, seed=1), in_qs=uniform(H, n, r, seed=2).requires_grad_(),
                      out_qs=uniform(H, m, r, seed=3).requires_grad_(), scale=tensor(seed=4),
                      weight=tensor(m, n, seed=5, grad=False), bias=tensor(m, seed=6, grad=False), kernel="snell",
                      mask_mode="binary")
        kernel = lambda **a: K.snella_linear(**a, materialize=True, backend="triton")  # noqa: E731
        reference = K.snella_linear_reference
    y, grads = _grads_of(kernel, inputs, autocast=True)
    y_bf16, grads_bf16 = _grads_of(lambda **a: kernel(**{**a, "x": a["x"].bfloat16()}), inputs, autocast=False)
    assert y.dtype == y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_bf16, rtol=0, atol=0)
    for name, got, want in zip([k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad],
                               grads, grads_bf16):
        assert got.dtype == inputs[name].dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    oracle = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    assert rel_err(y, reference(**oracle)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_a_bias_or_base_out_of_the_wrong_shape_is_refused(backend: str) -> None:
    """Every fused op checks a bias against its output width, and (Triton) base_out against the input's rows: the
    kernels read them by index, and a short bias once read past its end (the torch path broadcasts a (1,) bias)."""
    x = tensor(3, 6, grad=False)
    short_bias, tall_base = tensor(1, grad=False), tensor(4, 5, grad=False)
    with pytest.raises(ValueError, match=r"lowrank_linear: bias \(1,\) must be \(5,\)"):
        K.lowrank_linear(x, tensor(6, 2), tensor(2), tensor(5, 2), bias=short_bias, backend=backend)
    qs = dict(in_qs=tensor(1, 6, 2), out_qs=tensor(1, 5, 2), scale=tensor(), kernel="snell", coeffs=(1.0,))
    with pytest.raises(ValueError, match=r"snella_linear: bias \(1,\) must be \(5,\)"):
        K.snella_linear(x, **qs, bias=short_bias, backend=backend)
    tucker = _tucker_inputs((2, 3, 2), (3, 2, 2), (2, 3, 1), torch.float32, with_weight=False)
    with pytest.raises(ValueError, match=r"tucker_linear: bias \(1,\) must be \(12,\)"):
        K.tucker_linear(**{**tucker, "bias": short_bias}, backend=backend)
    if backend == "triton":
        with pytest.raises(ValueError, match="lowrank_linear base_out: 4 rows for the input's 3"):
            K.lowrank_linear(x, tensor(6, 2), tensor(2), tensor(5, 2), base_out=tall_base, backend=backend)
        A, B = tensor(1, 5, 2), tensor(1, 1, 3)
        with pytest.raises(ValueError, match="kronecker_linear base_out: 4 rows for the input's 3"):
            K.kronecker_linear(x, A, B, base_out=tall_base, backend=backend)
        with pytest.raises(ValueError, match="tucker_linear base_out: 2 rows for the input's 4"):
            K.tucker_linear(**tucker, base_out=tensor(2, 12, grad=False), mode="materialized", backend=backend)


def test_lowrank_reference_is_dense_update() -> None:
    x, W, b = tensor(6, 9, dtype=torch.float64), tensor(7, 9, dtype=torch.float64), tensor(7, dtype=torch.float64)
    V, s, U = tensor(9, 3, dtype=torch.float64), tensor(3, dtype=torch.float64), tensor(7, 3, dtype=torch.float64)
    y = K.lowrank_linear_reference(x, V, s, U, weight=W, bias=b)
    torch.testing.assert_close(y, x @ (W + U @ torch.diag(s) @ V.T).T + b)


def test_kronecker_reference_is_dense_kron() -> None:
    R, m1, n1, m2, n2, d_in, d_out = KRON_SHAPES[2]
    A, B = tensor(R, m1, n1, dtype=torch.float64), tensor(R, m2, n2, dtype=torch.float64)
    x = tensor(4, d_in, dtype=torch.float64)
    dense = sum(torch.kron(A[k], B[k]) for k in range(R))[:d_out, :d_in]
    torch.testing.assert_close(K.kronecker_linear_reference(x, A, B, out_features=d_out), x @ dense.T)


def test_tucker_reference_is_entrywise_index_map() -> None:
    """Δ[a, b] = 𝒳[j] with j_k = a_k·n_k + b_k for row-major multi-indices a, b (spec §1.2)."""
    out_modes, in_modes, ranks = TUCKER_SHAPES[0]
    core = tensor(*ranks, dtype=torch.float64, grad=False)
    factors = [tensor(a * b, r, dtype=torch.float64, grad=False) for a, b, r in zip(out_modes, in_modes, ranks)]
    full = torch.einsum("abc,ia,jb,kc->ijk", core, *factors)
    delta = K.tucker_delta(core, factors, out_modes, in_modes)
    for a in itertools.product(*map(range, out_modes)):
        for b in itertools.product(*map(range, in_modes)):
            row = (a[0] * out_modes[1] + a[1]) * out_modes[2] + a[2]
            col = (b[0] * in_modes[1] + b[1]) * in_modes[2] + b[2]
            j = [ak * nk + bk for ak, nk, bk in zip(a, in_modes, b)]
            assert abs(float(delta[row, col] - full[j[0], j[1], j[2]])) <= 1e-12


def test_snella_reference_matches_cdist_formula() -> None:
    H, n, m, r = 2, 6, 5, 3
    A, B = tensor(H, n, r, dtype=torch.float64, seed=1), tensor(H, m, r, dtype=torch.float64, seed=2)
    alpha, gamma, beta = (torch.tensor(v, dtype=torch.float64, device=DEVICE) for v in (0.7, 0.3, 0.05))
    D = 0.1 * torch.cdist(B[0], A[0]) - 0.1 * torch.cdist(B[1], A[1])
    expected = D + alpha * torch.softmax(D / gamma, dim=0) + beta
    torch.testing.assert_close(K.snella_kernel_matrix(A, B, alpha, gamma, beta), expected)
    x, scale = tensor(4, n, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64, device=DEVICE)
    tau = float(expected.detach().abs().flatten().sort().values[10:12].mean())
    masked = torch.where(expected.abs() > tau, expected * expected.abs(), 0.0)
    y = K.snella_linear_reference(x, A, B, scale, tau, alpha=alpha, gamma=gamma, beta=beta)
    torch.testing.assert_close(y, x @ (scale * masked).T)


# -- dispatch ---------------------------------------------------------------------------------------------------


def test_dispatch_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(2)
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.kernel_backend(cpu) == "torch"
    if K.HAS_TRITON and (CUDA or K.interpreting()):
        on_device = cpu.to(DEVICE)
        assert K.kernel_backend(on_device, backend="triton") == "triton"  # argument beats env
        with K.use_kernel_backend("triton"):  # process flag beats env
            assert K.kernel_backend(on_device) == "triton"
            assert K.kernel_backend(on_device, backend="torch") == "torch"
        assert K.kernel_backend(on_device) == "torch"  # context restored
    for back_to_env in ("auto", None):  # set or used, both hand the choice back to the env var
        K.set_kernel_backend("torch")
        K.set_kernel_backend(back_to_env)
        assert K.requested_backend() == "torch"
        with K.use_kernel_backend(back_to_env):
            monkeypatch.setenv(K.ENV_VAR, "auto")
            assert K.requested_backend() == "auto"
            monkeypatch.setenv(K.ENV_VAR, "torch")
    monkeypatch.setenv(K.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=K.ENV_VAR):
        K.kernel_backend(cpu)
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.kernel_backend(cpu) == "torch"  # auto never runs Triton on CPU tensors


def test_forced_triton_without_a_way_to_run_it_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET.*choose 'torch'.*config's kernel_backend"):
        K.kernel_backend(torch.zeros(2), backend="triton")
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="does not import"):
        K.kernel_backend(torch.zeros(2), backend="triton")
    assert K.kernel_backend(torch.zeros(2), backend="auto") == "torch"


def test_config_flag_forces_the_backend_of_every_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kernel_backend` in the config reaches every adapter, beats the env var, and is saved with the adapter."""
    from specpeft import SVFitConfig, get_adapter_model

    def adapted(flag: str) -> list:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        config = SVFitConfig(target_modules=["0", "2"], r=2, kernel_backend=flag)
        peft_model = get_adapter_model(model, config)
        return [m for m in peft_model.modules() if hasattr(m, "kernel_path")], peft_model

    monkeypatch.setenv(K.ENV_VAR, "triton")
    adapters, peft_model = adapted("torch")
    assert len(adapters) == 2 and all(a.kernel_backend == "torch" for a in adapters)
    assert all(a.kernel_path(torch.zeros(2)) == "torch" for a in adapters)  # the flag beats SPECPEFT_KERNELS=triton
    assert peft_model.peft_config["default"].to_dict()["kernel_backend"] == "torch"
    monkeypatch.setenv(K.ENV_VAR, "torch")
    adapters, _ = adapted("auto")
    assert all(a.kernel_path(torch.zeros(2)) == "torch" for a in adapters)  # "auto" defers to the env var
    if RUNNABLE:
        adapters, _ = adapted("triton")
        assert all(a.kernel_path(torch.zeros(2, device=DEVICE)) == "triton" for a in adapters)
    with pytest.raises(TypeError, match="kernel_backend"):
        SVFitConfig(target_modules=["0"], kernel_backend="cuda")


def test_auto_skips_triton_for_methods_whose_torch_path_trains_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """SVFit, SoKA and TeRA (`triton_by_default = False`) run torch under "auto" where Triton would run (CUDA, stood in
    for by a dispatcher that picks Triton), and Triton when the config or SPECPEFT_KERNELS forces it; FLoRA keeps
    Triton."""
    import specpeft.adapters.base as adapter_base
    from specpeft import FLoRAConfig, SoKAConfig, SVFitConfig, TeRAConfig, get_adapter_model

    monkeypatch.setattr(adapter_base, "kernel_backend", lambda *tensors, backend=None: backend or "triton")
    monkeypatch.delenv(K.ENV_VAR, raising=False)

    def paths(config_cls, flag: str, size: int = 16) -> set[str]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(size, size))
        adapted = get_adapter_model(model, config_cls(target_modules=["0"], kernel_backend=flag))
        return {m.kernel_path(torch.zeros(2)) for m in adapted.modules() if hasattr(m, "kernel_path")}

    assert paths(SVFitConfig, "auto") == paths(SoKAConfig, "auto") == paths(TeRAConfig, "auto", 256) == {"torch"}
    assert paths(FLoRAConfig, "auto") == {"triton"}
    assert paths(SVFitConfig, "triton") == paths(SoKAConfig, "triton") == paths(TeRAConfig, "triton") == {"triton"}
    monkeypatch.setenv(K.ENV_VAR, "triton")
    assert paths(SVFitConfig, "auto") == paths(TeRAConfig, "auto") == {"triton"}


def test_torch_backend_is_the_reference() -> None:
    x, V, s, U = tensor(5, 8), tensor(8, 2), tensor(2), tensor(6, 2)
    assert torch.equal(K.lowrank_linear(x, V, s, U, backend="torch"), K.lowrank_linear_reference(x, V, s, U))


def test_autocast_off_disables_only_an_enabled_autocast() -> None:
    a, b = torch.randn(2, 3), torch.randn(3, 2)  # CPU tensors whatever DEVICE is
    with _dispatch.autocast_off("cpu"):  # off already: a no-op context, nothing entered
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _dispatch.autocast_off("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert (a @ b).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")  # restored on exit
        assert (a @ b).dtype == torch.bfloat16


# -- CUDA only: the compiled kernels at realistic sizes ---------------------------------------------------------


@needs_cuda
def test_cuda_auto_dispatch_runs_triton() -> None:
    assert K.kernel_backend(torch.zeros(2, device="cuda")) == "triton"


@needs_cuda
def test_cuda_realistic_shapes_bf16() -> None:
    torch.manual_seed(0)
    dt, T, k, n, r = torch.bfloat16, 1000, 1024, 1536, 16
    inputs = dict(x=tensor(T, k, dtype=dt), down=tensor(k, r, scale=0.05), scale=tensor(r),
                  up=tensor(n, r, scale=0.05), weight=tensor(n, k, dtype=dt, grad=False, scale=0.03))
    compare(lambda **a: K.lowrank_linear(**a, backend="triton"), K.lowrank_linear_reference, inputs, dt)
    inputs = dict(x=tensor(T, 4096, dtype=dt), A=tensor(4, 64, 64, scale=0.1), B=tensor(4, 64, 64, scale=0.1))
    compare(lambda **a: K.kronecker_linear(**a, backend="triton"), K.kronecker_linear_reference, inputs, dt)
    for shape in ((1, 128, 128, 43, 16), (2, 64, 64, 32, 32)):  # A first, B first: the torch path's batched GEMMs
        R, m1, n1, m2, n2 = shape
        inputs = dict(x=tensor(T, n1 * n2, dtype=dt), A=tensor(R, m1, n1, scale=0.1), B=tensor(R, m2, n2, scale=0.1),
                      base_out=tensor(T, m1 * m2, dtype=dt))
        compare(lambda **a: K.kronecker_linear(**a, backend="torch"), K.kronecker_linear_reference, inputs, dt)
