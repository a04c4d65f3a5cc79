"""specpeft/kernels/kronecker_torch.py: the Kronecker factor gradients, the merged-weight op and the batched-GEMM op,
against autograd through the dense float64 formula y = x (W + Σ_k A_k ⊗ B_k)ᵀ + b (torch.kron, an independent
construction)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import specpeft.kernels as K
from specpeft.init.tucker_cost import kronecker_a_first, kronecker_grads_cost
from specpeft.kernels import kronecker_torch
from specpeft.kernels.kronecker_torch import (
    kronecker_factor_grads,
    kronecker_linear_bmm,
    kronecker_merged_linear,
    kronecker_merged_weight,
)

F64 = torch.float64
# (R, m1, n1, m2, n2, d_out, d_in): both problems of `kronecker_factor_grads` (adjoint: 1st, 3rd-5th, 9th-11th), one
# and several components, exact tiling and SoKA-style zero padding of the input, the output or both, in each
SHAPES = [
    (1, 6, 4, 3, 5, 18, 20),
    (1, 3, 5, 6, 4, 18, 20),
    (3, 5, 7, 3, 4, 13, 20),
    (2, 4, 3, 5, 6, 20, 17),
    (1, 8, 8, 2, 6, 16, 48),
    (2, 3, 5, 6, 4, 18, 20),
    (3, 2, 6, 7, 3, 11, 16),
    (1, 2, 7, 5, 3, 10, 19),
    (1, 6, 4, 3, 5, 17, 19),
    (2, 6, 4, 3, 5, 18, 20),
    (1, 6, 4, 3, 5, 17, 20),
    (2, 3, 5, 6, 4, 16, 20),
]


def _factors(R: int, m1: int, n1: int, m2: int, n2: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(R, m1, n1, dtype=F64, generator=gen), torch.randn(R, m2, n2, dtype=F64, generator=gen)


def _dense(A: torch.Tensor, B: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    return sum(torch.kron(a, b) for a, b in zip(A, B))[:d_out, :d_in]  # (m1·m2, n1·n2) cropped


def _padding(m1: int, n1: int, m2: int, n2: int, d_out: int, d_in: int) -> str:
    return {(False, False): "none", (True, False): "output", (False, True): "input", (True, True): "both"}[
        (d_out < m1 * m2, d_in < n1 * n2)]


def test_shapes_cover_both_orders() -> None:
    cases = {(kronecker_grads_cost(m1, n1, m2, n2)[2], R > 1, _padding(m1, n1, m2, n2, d_out, d_in))
             for R, m1, n1, m2, n2, d_out, d_in in SHAPES}
    for adjoint in (True, False):
        assert {padding for run, _, padding in cases if run == adjoint} == {"none", "output", "input", "both"}
        assert {several for run, several, _ in cases if run == adjoint} == {True, False}


@pytest.mark.parametrize("chunks", ["one", "ragged"])
@pytest.mark.parametrize("shape", SHAPES)
def test_factor_grads_equal_autograd_of_the_dense_formula(shape: tuple, chunks: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    R, m1, n1, m2, n2, d_out, d_in = shape
    ranges: list[list[tuple[int, int]]] = []
    if chunks == "ragged":  # chunks of 3 tokens over 11: 3, 3, 3, 2

        def three_per_chunk(tokens: int, *_: object) -> list[tuple[int, int]]:
            ranges.append([(start, min(tokens, start + 3)) for start in range(0, tokens, 3)])
            return ranges[-1]

        monkeypatch.setattr(kronecker_torch, "token_chunks", three_per_chunk)
    A, B = _factors(R, m1, n1, m2, n2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, d_in, dtype=F64, generator=gen)
    grad_y = torch.randn(11, d_out, dtype=F64, generator=gen)
    a, b = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    want = torch.autograd.grad(x @ _dense(a, b, d_out, d_in).T, [a, b], grad_y)
    got = kronecker_factor_grads(x, grad_y, A, B)
    assert chunks == "one" or ranges == [[(0, 3), (3, 6), (6, 9), (9, 11)]]
    for g, w in zip(got, want):
        assert g.dtype == F64
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-11)
    only_b = kronecker_factor_grads(x, grad_y, A, B, need_a=False)
    only_a = kronecker_factor_grads(x, grad_y, A, B, need_b=False)
    assert only_b[0] is None and torch.equal(only_b[1], got[1])
    assert only_a[1] is None and torch.equal(only_a[0], got[0])


@pytest.mark.parametrize("shape", SHAPES + [(1, 24, 24, 16, 16, 384, 384), (1, 64, 64, 24, 6, 1536, 384),
                                            (1, 64, 64, 6, 24, 384, 1536)])  # + TeRA's MiniLM layers
def test_factor_grads_run_the_cheaper_problem(shape: tuple) -> None:
    """The GEMMs run exactly the MACs `kronecker_grads_cost` prices, the fewer of the two problems (at 1536×384 the
    other costs 3.2× more), counted by torch's FLOP counter."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2)
    x, grad_y = torch.randn(5, d_in, dtype=F64), torch.randn(5, d_out, dtype=F64)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        kronecker_factor_grads(x, grad_y, A, B)
    macs, _, _ = kronecker_grads_cost(m1, n1, m2, n2)
    m, n = m1 * m2, n1 * n2
    assert counter.get_total_flops() == 2 * 5 * R * macs == 2 * 5 * R * 2 * min(m * n2 + n * m1, n * m2 + m * n1)


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[5] == s[1] * s[3] and s[6] == s[2] * s[4]])
def test_merged_linear_equals_the_dense_formula(shape: tuple, with_weight: bool) -> None:
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=2)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(d_out, d_in, dtype=F64, generator=gen) if with_weight else None
    bias = torch.randn(d_out, dtype=F64, generator=gen) if with_weight else None
    x = torch.randn(2, 5, d_in, dtype=F64, generator=gen, requires_grad=True)
    a, b = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    out = kronecker_merged_linear(x, a, b, weight, bias)
    x_ref, a_ref, b_ref = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    dense = _dense(a_ref, b_ref, d_out, d_in)
    reference = F.linear(x_ref, dense if weight is None else weight + dense, bias)
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)
    upstream = torch.randn(out.shape, dtype=F64, generator=gen)
    got = torch.autograd.grad(out, [x, a, b], upstream)
    want = torch.autograd.grad(reference, [x_ref, a_ref, b_ref], upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-11)


def test_merged_weight_is_w_plus_kron_and_exact_at_zero() -> None:
    A, B = _factors(2, 3, 4, 5, 2, seed=4)
    weight = torch.randn(15, 8, dtype=F64)
    torch.testing.assert_close(kronecker_merged_weight(weight, A, B), weight + _dense(A, B, 15, 8), atol=1e-14, rtol=0)
    torch.testing.assert_close(kronecker_merged_weight(None, A, B), _dense(A, B, 15, 8), atol=1e-14, rtol=0)
    assert torch.equal(kronecker_merged_weight(weight, torch.zeros_like(A), B), weight)  # W + 0 is W, bit for bit
    bf16 = torch.randn(15, 8).to(torch.bfloat16)
    zero = kronecker_merged_weight(bf16, torch.zeros(2, 3, 4), B.float())
    assert zero.dtype == torch.float32 and torch.equal(zero.to(torch.bfloat16), bf16)
    fp64 = kronecker_merged_weight(weight, torch.zeros(2, 3, 4), B.float())  # fp32 factors do not round an fp64 W
    assert fp64.dtype == F64 and torch.equal(fp64, weight)


def test_merged_linear_under_bf16_autocast_matches_fp32() -> None:
    """Autocast runs the GEMMs in bf16 (x cast once, one dtype through backward); the factor gradients are
    contracted in the factors' fp32 and stay within bf16 rounding of the fp32 result."""
    A, B = (t.float() for t in _factors(2, 6, 4, 3, 5, seed=6))
    gen = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(18, 20, generator=gen), torch.randn(18, generator=gen)
    x = torch.randn(64, 20, generator=gen)
    upstream = torch.randn(64, 18, generator=gen)
    results = []
    for autocast in (False, True):
        a, b, inp = (t.clone().requires_grad_(True) for t in (A, B, x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = kronecker_merged_linear(inp, a, b, weight, bias)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        out.float().backward(upstream)
        assert a.grad.dtype == b.grad.dtype == torch.float32 and inp.grad.dtype == torch.float32
        results.append((out.float(), a.grad, b.grad, inp.grad))
    for low, high in zip(results[1], results[0]):
        assert ((low - high).norm() / high.norm()).item() < 2e-2


def test_merged_linear_refuses_a_trainable_base() -> None:
    A, B = _factors(1, 2, 3, 4, 5)
    weight = torch.randn(8, 15, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="weight and bias must be frozen"):
        kronecker_merged_linear(torch.randn(2, 15, dtype=F64), A, B, weight)


def test_merged_linear_saves_no_weight_sized_tensor() -> None:
    """Only x, the factors and the frozen weight itself are kept for backward: W + ΔW is rebuilt there."""
    d_out, d_in = 48, 40
    A, B = (t.float().requires_grad_(True) for t in _factors(1, 8, 5, 6, 8, seed=5))
    weight = torch.randn(d_out, d_in)
    x = torch.randn(3, d_in, requires_grad=True)
    saved: list[tuple[int, int]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.numel(), t.data_ptr())) or t, lambda t: t):
        out = kronecker_merged_linear(x, A, B, weight)
    assert max(numel for numel, ptr in saved if ptr != weight.data_ptr()) < d_out * d_in
    out.sum().backward()
    assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_merged_linear_names_the_bad_shape() -> None:
    A, B = _factors(1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"kronecker_merged_linear: x \(\.\.\., 14\)"):
        kronecker_merged_linear(torch.randn(2, 14, dtype=F64), A, B)
    with pytest.raises(ValueError, match="same number R"):
        kronecker_merged_linear(torch.randn(2, 15, dtype=F64), A, B.repeat(2, 1, 1))


def test_merged_linear_keeps_an_fp64_input_in_fp64() -> None:
    """fp64 x and W with fp32 factors: W + ΔW is formed in fp64, and autocast leaves fp64 alone."""
    A, B = (t.float() for t in _factors(1, 3, 4, 5, 2, seed=8))
    weight, x = torch.randn(15, 8, dtype=F64), torch.randn(4, 8, dtype=F64)
    reference = F.linear(x, weight + _dense(A.double(), B.double(), 15, 8))  # products of the fp32 values, in fp64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kronecker_merged_linear(x, A, B, weight)
    assert out.dtype == F64
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("ranks", [(3, 2, 1), (3, 2, 2)])
def test_tucker_network_through_the_merged_op_equals_the_tucker_reference(ranks: tuple[int, ...]) -> None:
    """TeRA's merged path: `kernels.tucker.kronecker_factors` splits a Tucker network at its last mode into
    Σ_r A_r ⊗ B_r (R_N products) and `kronecker_merged_linear` runs them; output and the gradients of x, the core and
    every factor equal `tucker_linear_reference` (autograd through the dense Δ) in float64."""
    out_modes, in_modes = (4, 2, 8), (4, 2, 8)
    gen = torch.Generator().manual_seed(9)
    core = torch.randn(ranks, dtype=F64, generator=gen)
    factors = [torch.randn(m * n, r, dtype=F64, generator=gen) for m, n, r in zip(out_modes, in_modes, ranks)]
    weight, bias = torch.randn(64, 64, dtype=F64, generator=gen), torch.randn(64, dtype=F64, generator=gen)
    x = torch.randn(2, 3, 64, dtype=F64, generator=gen)
    upstream = torch.randn(2, 3, 64, dtype=F64, generator=gen)

    def merged(inp: torch.Tensor, c: torch.Tensor, *fs: torch.Tensor) -> torch.Tensor:
        A, B = K.tucker.kronecker_factors(c, fs, out_modes, in_modes)
        return kronecker_merged_linear(inp, A, B, weight, bias)

    def reference(inp: torch.Tensor, c: torch.Tensor, *fs: torch.Tensor) -> torch.Tensor:
        return K.tucker_linear_reference(inp, c, list(fs), out_modes, in_modes, weight=weight, bias=bias)

    results = []
    for op in (merged, reference):
        leaves = [t.clone().requires_grad_(True) for t in (x, core, *factors)]
        out = op(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


def test_empty_batch_gives_zero_factor_gradients() -> None:
    """T = 0 tokens (an empty micro-batch): output (0, m), zero factor gradients of the factors' shapes."""
    A = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    y = K.kronecker_merged_linear(torch.randn(0, 18, dtype=torch.float64), A, B)
    assert y.shape == (0, 20)
    grad_a, grad_b = torch.autograd.grad(y.sum(), (A, B))
    assert torch.equal(grad_a, torch.zeros_like(A)) and torch.equal(grad_b, torch.zeros_like(B))


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[6], SHAPES[8]])  # both problems, padded and exact
def test_factor_grads_of_bf16_activations_in_fp32(shape: tuple) -> None:
    """bf16 x and dY with dtype=float32 (the merged op's backward under autocast): the copied side and the side read
    in place are both cast, and the result is fp32 and equals the formula on the bf16 values."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, d_in, generator=gen).to(torch.bfloat16)
    grad_y = torch.randn(9, d_out, generator=gen).to(torch.bfloat16)
    a, b = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    want = torch.autograd.grad(x.double() @ _dense(a, b, d_out, d_in).T, [a, b], grad_y.double())
    got = kronecker_factor_grads(x, grad_y, A.float(), B.float(), dtype=torch.float32)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.is_contiguous()
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_merged_weight_of_no_components_is_the_weight() -> None:
    weight = torch.randn(6, 20, dtype=torch.bfloat16)
    A, B = torch.zeros(0, 3, 4), torch.zeros(0, 2, 5)
    merged = kronecker_merged_weight(weight, A, B)
    assert merged.dtype == torch.float32 and torch.equal(merged, weight.float())
    assert torch.equal(kronecker_merged_weight(None, A, B), torch.zeros(6, 20))
    x = torch.randn(4, 20)
    torch.testing.assert_close(kronecker_merged_linear(x, A, B, weight.float()), x @ weight.float().T)


def test_factor_grads_of_no_components_are_empty() -> None:
    A, B = torch.zeros(0, 3, 4), torch.zeros(0, 2, 5)
    grad_a, grad_b = kronecker_factor_grads(torch.randn(7, 20), torch.randn(7, 6), A, B)
    assert grad_a.shape == A.shape and grad_b.shape == B.shape
    assert kronecker_factor_grads(torch.randn(7, 20), torch.randn(7, 6), A, B, need_a=False)[0] is None


def test_merged_weight_of_strided_factors() -> None:
    """Factors passed as non-contiguous views (a transposed copy of the layout) build the same Σ_k A_k ⊗ B_k."""
    A = torch.randn(2, 3, 4, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)  # (2, 3, 4), strided
    B = torch.randn(2, 5, 2, dtype=torch.float64)
    assert not A.is_contiguous()
    dense = _dense(A.contiguous(), B, 15, 8)  # torch.kron itself rejects the strided view
    torch.testing.assert_close(kronecker_merged_weight(None, A, B), dense, atol=1e-12, rtol=0)


# -- kronecker_linear_bmm (the CUDA torch path of kernels.kronecker_linear) ----------------------------------------


def test_bmm_shapes_cover_both_orders() -> None:
    assert {kronecker_a_first(m1, n1, m2, n2) for _, m1, n1, m2, n2, _, _ in SHAPES} == {True, False}


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_bmm_linear_equals_the_dense_formula(shape: tuple, with_base: bool) -> None:
    """Output and the gradients of x, A, B and base_out, with leading batch dims and SoKA-style padding."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=8)
    gen = torch.Generator().manual_seed(9)
    x, base = torch.randn(2, 5, d_in, dtype=F64, generator=gen), torch.randn(2, 5, d_out, dtype=F64, generator=gen)
    upstream = torch.randn(2, 5, d_out, dtype=F64, generator=gen)
    results = []
    for op in ("bmm", "dense"):
        leaves = [t.clone().requires_grad_(True) for t in ((x, A, B, base) if with_base else (x, A, B))]
        if op == "bmm":
            out = kronecker_linear_bmm(*leaves[:3], base_out=leaves[3] if with_base else None, out_features=d_out)
        else:
            out = leaves[0] @ _dense(leaves[1], leaves[2], d_out, d_in).T + (leaves[3] if with_base else 0)
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    assert results[0][0].shape == (2, 5, d_out)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2]])
def test_bmm_linear_computes_only_the_gradients_asked_for(shape: tuple) -> None:
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=10)
    x = torch.randn(7, d_in, dtype=F64, generator=torch.Generator().manual_seed(11))
    upstream = torch.randn(7, d_out, dtype=F64, generator=torch.Generator().manual_seed(12))
    a, b = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    want = torch.autograd.grad(x @ _dense(a, b, d_out, d_in).T, [a, b], upstream)
    for leaf, reference in ((a, want[0]), (b, want[1])):  # x and the other factor need no gradient
        frozen = [t.detach() if t is not leaf else t for t in (a, b)]
        (got,) = torch.autograd.grad(kronecker_linear_bmm(x, *frozen, out_features=d_out), [leaf], upstream)
        torch.testing.assert_close(got, reference, atol=1e-11, rtol=1e-11)


def test_bmm_linear_takes_strided_inputs_and_expanded_gradients() -> None:
    """A transposed x, a base_out view and the stride-0 gradient of `.sum()` give the dense formula's results."""
    A, B = _factors(2, 4, 3, 5, 6, seed=13)
    gen = torch.Generator().manual_seed(14)
    x, base = torch.randn(18, 9, dtype=F64, generator=gen).T, torch.randn(20, 9, dtype=F64, generator=gen).T
    assert not x.is_contiguous() and not base.is_contiguous()
    results = []
    for op in ("bmm", "dense"):
        leaves = [t.clone().requires_grad_(True) for t in (A, B)]
        out = (kronecker_linear_bmm(x, *leaves, base_out=base) if op == "bmm"
               else x @ _dense(*leaves, 20, 18).T + base)
        results.append((out, *torch.autograd.grad(out.sum(), leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


def test_bmm_linear_empty_batch_gives_zero_factor_gradients() -> None:
    A = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    B = torch.randn(2, 5, 6, dtype=F64, requires_grad=True)
    y = kronecker_linear_bmm(torch.randn(0, 18, dtype=F64), A, B)
    assert y.shape == (0, 20)
    grad_a, grad_b = torch.autograd.grad(y.sum(), (A, B))
    assert torch.equal(grad_a, torch.zeros_like(A)) and torch.equal(grad_b, torch.zeros_like(B))


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])  # B first, A first
def test_bmm_linear_under_bf16_autocast_matches_fp32(shape: tuple) -> None:
    """Autocast runs the op in bf16 (x and base_out cast once); the factor gradients come back in the factors'
    fp32 within bf16 rounding of the fp32 run."""
    A, B = (t.float() for t in _factors(*shape[:5], seed=15))
    gen = torch.Generator().manual_seed(16)
    x, base, upstream = torch.randn(64, 20, generator=gen), torch.randn(64, 18, generator=gen), torch.randn(64, 18)
    results = []
    for autocast in (False, True):
        a, b, inp = (t.clone().requires_grad_(True) for t in (A, B, x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = kronecker_linear_bmm(inp, a, b, base_out=base)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        out.float().backward(upstream)
        assert a.grad.dtype == b.grad.dtype == inp.grad.dtype == torch.float32
        results.append((out.float(), a.grad, b.grad, inp.grad))
    for low, high in zip(results[1], results[0]):
        assert ((low - high).norm() / high.norm()).item() < 2e-2


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])  # B first, A first
def test_bmm_linear_compiles_as_one_graph_and_matches_eager(shape: tuple) -> None:
    """TeRA's factored CUDA path under torch.compile (aot_eager traces forward and backward, fullgraph: no break)."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = (t.float() for t in _factors(R, m1, n1, m2, n2, seed=17))
    gen = torch.Generator().manual_seed(18)
    x, base, upstream = (torch.randn(9, d, generator=gen) for d in (d_in, d_out, d_out))

    def step(op) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, base)]
        out = op(*leaves[:3], base_out=leaves[3], out_features=d_out)
        return [out, *torch.autograd.grad(out, leaves, upstream)]

    torch._dynamo.reset()
    compiled = step(torch.compile(kronecker_linear_bmm, backend="aot_eager", fullgraph=True))
    for got, want in zip(compiled, step(kronecker_linear_bmm)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])  # B first, A first
def test_bmm_linear_saves_only_what_the_needed_gradients_read(shape: tuple) -> None:
    """The forward's intermediate Z_tᵀ (B first) is saved only for dA, U_t (A first) only for dB, and x only for the
    other factor's gradient: a frozen adapter keeps no activation-sized tensor."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    tokens = 37  # no factor dimension equals it
    reads_intermediate = "B" if kronecker_a_first(m1, n1, m2, n2) else "A"
    for trainable in ("x", "A", "B"):
        x, A, B = torch.randn(tokens, d_in), *(t.float() for t in _factors(R, m1, n1, m2, n2))
        leaves = dict(x=x, A=A, B=B)
        leaves[trainable].requires_grad_(True)
        saved: list[torch.Size] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            kronecker_linear_bmm(leaves["x"], leaves["A"], leaves["B"], out_features=d_out)
        token_sized = [shape for shape in saved if shape[0] == tokens]
        expected = 0 if trainable == "x" else R if trainable == reads_intermediate else 1
        assert len(token_sized) == expected, (trainable, saved)


def test_bmm_linear_with_no_components_adds_nothing() -> None:
    A, B = torch.zeros(0, 3, 4, requires_grad=True), torch.zeros(0, 5, 2, requires_grad=True)
    x, base = torch.randn(6, 8, requires_grad=True), torch.randn(6, 15)
    assert torch.equal(kronecker_linear_bmm(x, A, B), torch.zeros(6, 15))
    out = kronecker_linear_bmm(x, A, B, base_out=base)
    assert torch.equal(out, base)
    grads = torch.autograd.grad(out.sum(), [x, A, B])
    assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(grads, (x, A, B)))
