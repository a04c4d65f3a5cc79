"""specpeft/kernels/kronecker_gemm.py: `kernels.kronecker_linear`'s CPU torch op (2-D GEMMs, both contraction orders),
against autograd through the dense float64 formula y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ (torch.kron, an independent
construction), cropped to (d_out, d_in)."""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import specpeft.kernels as K
from specpeft.init.tucker_cost import kronecker_a_first
from specpeft.kernels.kronecker_gemm import KroneckerGemmFunction, kronecker_linear_gemm
from specpeft.kernels.kronecker_torch import KroneckerBmmFunction, kronecker_linear_bmm
from test_kronecker_torch import _dense, _factors

F64 = torch.float64
# (R, m1, n1, m2, n2, d_out, d_in): in each contraction order (A first: the last four) one component and several,
# exact tiling and zero padding of the input only, the output only, and both
SHAPES = [
    (1, 6, 4, 3, 5, 18, 20),
    (3, 5, 7, 3, 4, 13, 20),
    (2, 4, 3, 5, 6, 20, 17),
    (2, 6, 4, 3, 5, 17, 20),
    (1, 3, 5, 6, 4, 18, 20),
    (3, 2, 6, 7, 3, 11, 16),
    (1, 2, 7, 5, 3, 10, 19),
    (2, 3, 5, 6, 4, 15, 20),
]
B_FIRST, A_FIRST = SHAPES[0], SHAPES[4]  # exact tiling: base_out goes through the op that writes y's layout
B_FIRST_CROPPED, A_FIRST_CROPPED = SHAPES[3], SHAPES[7]  # d_out < m1·m2: base_out added after the crop


def _reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: Optional[torch.Tensor], d_out: int,
               ) -> torch.Tensor:
    out = x @ _dense(A, B, d_out, x.shape[-1]).T
    return out if base is None else out + base


def _padding(shape: tuple) -> str:
    _, m1, n1, m2, n2, d_out, d_in = shape
    pad_in, pad_out = d_in < n1 * n2, d_out < m1 * m2
    return {(False, False): "none", (True, False): "in", (False, True): "out", (True, True): "both"}[pad_in, pad_out]


def _run(op: Callable[..., torch.Tensor], leaves: dict[str, torch.Tensor], d_out: int) -> torch.Tensor:
    return op(leaves["x"], leaves["A"], leaves["B"], leaves.get("base"), d_out)


def _gemm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: Optional[torch.Tensor], d_out: int,
          ) -> torch.Tensor:
    return kronecker_linear_gemm(x, A, B, base_out=base, out_features=d_out)


class _CountGemms(TorchDispatchMode):
    """Counts the 2-D GEMMs (mm, addmm, addmm_) run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (),
                           kwargs: Optional[dict] = None) -> object:
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_shapes_cover_both_orders_components_and_padding() -> None:
    """SHAPES runs both contraction orders, each with R = 1 and R > 1 and every kind of zero padding."""
    cases = {(kronecker_a_first(m1, n1, m2, n2), R, _padding(s)) for s in SHAPES for R, m1, n1, m2, n2, _, _ in [s]}
    assert {order for order, _, _ in cases} == {True, False}
    assert {R for _, R, _ in cases} == {1, 2, 3}
    for order in (True, False):
        assert {pad for o, _, pad in cases if o == order} == {"none", "in", "out", "both"}
        assert {R > 1 for o, R, _ in cases if o == order} == {True, False}
    assert kronecker_a_first(*A_FIRST[1:5]) and kronecker_a_first(*A_FIRST_CROPPED[1:5])
    assert not kronecker_a_first(*B_FIRST[1:5]) and not kronecker_a_first(*B_FIRST_CROPPED[1:5])
    assert _padding(A_FIRST) == _padding(B_FIRST) == "none"
    assert _padding(A_FIRST_CROPPED) == _padding(B_FIRST_CROPPED) == "out"


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_equal_the_dense_formula(shape: tuple, with_base: bool) -> None:
    """Output and the gradients of x, A, B and base_out equal autograd through the dense float64 formula, for x and
    base_out with leading batch dims (2, 5, ·)."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=1)
    gen = torch.Generator().manual_seed(2)
    x, base = torch.randn(2, 5, d_in, dtype=F64, generator=gen), torch.randn(2, 5, d_out, dtype=F64, generator=gen)
    upstream = torch.randn(2, 5, d_out, dtype=F64, generator=gen)
    results = []
    for op in (_gemm, _reference):
        leaves = {name: t.clone().requires_grad_(True)
                  for name, t in dict(x=x, A=A, B=B, **(dict(base=base) if with_base else {})).items()}
        out = _run(op, leaves, d_out)
        results.append((out, *torch.autograd.grad(out, list(leaves.values()), upstream)))
        if op is _gemm:  # the inputs are read, never written (base_out is not accumulated into in place)
            assert torch.equal(leaves["x"], x) and (not with_base or torch.equal(leaves["base"], base))
    assert results[0][0].shape == (2, 5, d_out) and results[0][0].dtype == F64
    assert len(results[0]) == (5 if with_base else 4)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("op", [kronecker_linear_gemm, kronecker_linear_bmm])
@pytest.mark.parametrize("layout", ["permuted", "sliced"])
@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, SHAPES[2], SHAPES[5]])
def test_strided_inputs_equal_the_dense_formula(op: Callable[..., torch.Tensor], shape: tuple, layout: str) -> None:
    """x and base_out as permuted views (a transposed activation) or column slices (one part of a fused projection),
    whose rows are not contiguous: output and gradients as for contiguous inputs."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=19)
    gen = torch.Generator().manual_seed(20)
    if layout == "permuted":  # (2, 5, d) from (d, 5, 2)
        x = torch.randn(d_in, 5, 2, dtype=F64, generator=gen).permute(2, 1, 0)
        base = torch.randn(5, d_out, 2, dtype=F64, generator=gen).permute(2, 0, 1)
    else:  # (2, 5, d) from (2, 5, d + 3)
        x = torch.randn(2, 5, d_in + 3, dtype=F64, generator=gen)[..., 1:d_in + 1]
        base = torch.randn(2, 5, d_out + 3, dtype=F64, generator=gen)[..., :d_out]
    upstream = torch.randn(2, 5, d_out, dtype=F64, generator=gen)
    assert not x.is_contiguous() and not base.is_contiguous()
    results = []
    for run in (op, lambda *a, **k: K.kronecker_linear_reference(*a, **k)):
        leaves = [t.detach().requires_grad_(True) for t in (x, A, B, base)]
        out = run(*leaves[:3], base_out=leaves[3], out_features=d_out)
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("trainable", [("x",), ("A",), ("B",), ("x", "A"), ("x", "B"), ("A", "B"), ("B", "base")])
@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, SHAPES[1], SHAPES[5]])
def test_only_the_gradients_asked_for_are_computed(shape: tuple, trainable: tuple[str, ...]) -> None:
    """With some of x, A, B, base_out frozen, the gradients of the others still equal the dense formula's, and the
    op's backward returns None for every frozen input (it does not compute them)."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=3)
    gen = torch.Generator().manual_seed(4)
    x, base = torch.randn(7, d_in, dtype=F64, generator=gen), torch.randn(7, d_out, dtype=F64, generator=gen)
    upstream = torch.randn(7, d_out, dtype=F64, generator=gen)
    tensors = dict(x=x, A=A, B=B, base=base)
    leaves = {name: t.clone().requires_grad_(name in trainable) for name, t in tensors.items()}
    refs = {name: t.clone().requires_grad_(name in trainable) for name, t in tensors.items()}
    got = torch.autograd.grad(_run(_gemm, leaves, d_out), [leaves[name] for name in trainable], upstream)
    want = torch.autograd.grad(_run(_reference, refs, d_out), [refs[name] for name in trainable], upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-11)
    # the node itself: its backward's outputs (x, A, B, base_out) and the GEMMs it runs per component: dX needs
    # Wₘ = A_kᵀ G'ᵀ and W' B_k, the run problem's dB Wₘ (shared) and W'ᵀ X, its dA one GEMM Zₘ G'. It takes base_out
    # only when it covers the output (a cropped output gets it added outside the node).
    full = d_out == m1 * m2
    out = KroneckerGemmFunction.apply(leaves["x"], leaves["A"], leaves["B"], leaves["base"] if full else None)
    with _CountGemms() as gemms:
        grads = dict(zip(("x", "A", "B", "base"), out.grad_fn.apply(_full_width(upstream, m1 * m2, out.shape))))
    run_a, run_b = ("B", "A") if kronecker_a_first(m1, n1, m2, n2) else ("A", "B")
    need_w = "x" in trainable or run_b in trainable
    assert gemms.count == R * (need_w + ("x" in trainable) + (run_b in trainable) + (run_a in trainable))
    for name, grad in grads.items():
        assert (grad is None) == (name not in trainable or (name == "base" and not full)), (name, trainable)
        if grad is not None:
            torch.testing.assert_close(grad, got[trainable.index(name)], atol=1e-11, rtol=1e-11)


def _full_width(upstream: torch.Tensor, width: int, shape: torch.Size) -> torch.Tensor:
    """An upstream gradient (T, d_out) as the op's output sees it: zero columns up to m1·m2, in its layout."""
    return torch.nn.functional.pad(upstream, (0, width - upstream.shape[-1])).reshape(shape)


def _op_node(out: torch.Tensor) -> torch.autograd.graph.Node:
    """The `KroneckerGemmFunction` node behind a wrapper's output (past its reshapes, crop and base add)."""
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "KroneckerGemmFunctionBackward":
            return node
        stack.extend(n for n, _ in node.next_functions if n is not None)
    raise AssertionError("no KroneckerGemmFunction node in the graph")


@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, SHAPES[1], SHAPES[5]])  # B first, A first (R = 1, R = 3)
def test_saves_only_what_the_needed_gradients_read(shape: tuple) -> None:
    """The factors (in x's dtype, run order) are always saved; x laid out for the run problem — (T·n1, n2) B first,
    (T·n2, n1) A first — only for the run problem's dB (B's gradient B first, A's A first); the R intermediates Zₘ —
    (n1, T·m2) B first, (n2, T·m1) A first — only for the run problem's dA (A's gradient B first, B's A first). A
    frozen adapter (only x trainable) keeps no activation-sized tensor."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    tokens = 37  # prime, above every factor dimension: a token-sized tensor has a multiple of 37 in its shape
    a_first = kronecker_a_first(m1, n1, m2, n2)
    x_layout = (tokens * n2, n1) if a_first else (tokens * n1, n2)
    z_layout = (n2, tokens * m1) if a_first else (n1, tokens * m2)
    factors = [(R, m2, n2), (R, m1, n1)] if a_first else [(R, m1, n1), (R, m2, n2)]
    reads_z, reads_x = ("B", "A") if a_first else ("A", "B")
    for trainable in (("x",), ("A",), ("B",), ("A", "B"), ("x", "A", "B")):
        A, B = _factors(R, m1, n1, m2, n2, seed=5)
        leaves = dict(x=torch.randn(tokens, d_in, dtype=F64), A=A, B=B)
        for name in trainable:
            leaves[name].requires_grad_(True)
        saved: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = kronecker_linear_gemm(leaves["x"], leaves["A"], leaves["B"], out_features=d_out)
        needs_factor = "A" in trainable or "B" in trainable
        expected = [*factors, *([x_layout] if reads_x in trainable else []),
                    *([z_layout] * R if reads_z in trainable else [])]
        assert sorted(saved) == sorted(expected), (trainable, saved)
        if not needs_factor:
            assert not [s for s in saved if any(size % tokens == 0 for size in s)], saved
            node = _op_node(out)
            assert [tuple(t.shape) if t is not None else None for t in node.saved_tensors] == [None, *factors,
                                                                                             *[None] * R]


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, B_FIRST_CROPPED, A_FIRST_CROPPED])
def test_no_components_give_base_out_and_zero_gradients(shape: tuple, with_base: bool) -> None:
    """R = 0 (A (0, m1, n1), B (0, m2, n2)): y is base_out (or zeros) exactly, x's gradient is zero, the factors'
    gradients are empty, base_out's is the upstream gradient."""
    _, m1, n1, m2, n2, d_out, d_in = shape
    A, B = torch.zeros(0, m1, n1, dtype=F64, requires_grad=True), torch.zeros(0, m2, n2, dtype=F64, requires_grad=True)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, d_in, dtype=F64, generator=gen, requires_grad=True)
    base = torch.randn(2, 3, d_out, dtype=F64, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 3, d_out, dtype=F64, generator=gen)
    out = kronecker_linear_gemm(x, A, B, base_out=base if with_base else None, out_features=d_out)
    assert out.shape == (2, 3, d_out)
    assert torch.equal(out, base) if with_base else torch.equal(out, torch.zeros(2, 3, d_out, dtype=F64))
    inputs = [x, A, B, base] if with_base else [x, A, B]
    grads = torch.autograd.grad(out, inputs, upstream)
    assert torch.equal(grads[0], torch.zeros_like(x))
    assert grads[1].shape == A.shape and grads[2].shape == B.shape
    if with_base:
        assert torch.equal(grads[3], upstream)


@pytest.mark.parametrize("batch", [(0,), (2, 0)])
@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, SHAPES[2], SHAPES[5]])
def test_empty_batch_gives_an_empty_output_and_zero_gradients(shape: tuple, batch: tuple[int, ...]) -> None:
    """T = 0 tokens: output (..., 0, d_out) without error, x's and base_out's gradients empty, the factors'
    gradients zeros of their shapes."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = (t.requires_grad_(True) for t in _factors(R, m1, n1, m2, n2, seed=7))
    x = torch.randn(*batch, d_in, dtype=F64, requires_grad=True)
    for base in (None, torch.randn(*batch, d_out, dtype=F64, requires_grad=True)):
        out = kronecker_linear_gemm(x, A, B, base_out=base, out_features=d_out)
        assert out.shape == (*batch, d_out)
        inputs = [x, A, B] if base is None else [x, A, B, base]
        grads = torch.autograd.grad(out.sum(), inputs)
        assert grads[0].shape == x.shape
        assert torch.equal(grads[1], torch.zeros_like(A)) and torch.equal(grads[2], torch.zeros_like(B))
        if base is not None:
            assert grads[3].shape == base.shape


@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, B_FIRST_CROPPED, A_FIRST_CROPPED])
def test_expanded_bias_as_base_out(shape: tuple) -> None:
    """base_out = bias.expand(T, d_out) (stride 0 over the tokens, what a linear layer's bias broadcast gives): the
    output and the gradients of bias, x, A and B equal the dense formula's."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=8)
    gen = torch.Generator().manual_seed(9)
    x, bias = torch.randn(11, d_in, dtype=F64, generator=gen), torch.randn(d_out, dtype=F64, generator=gen)
    upstream = torch.randn(11, d_out, dtype=F64, generator=gen)
    results = []
    for op in (_gemm, _reference):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, bias)]
        base = leaves[3].expand(11, d_out)
        assert base.stride() == (0, 1)
        out = op(*leaves[:3], base, d_out)
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, SHAPES[1], SHAPES[5]])
def test_under_bf16_autocast_matches_fp32(shape: tuple) -> None:
    """Autocast runs the op in bf16 (x and base_out cast once): a bf16 output within bf16 rounding of the fp32 run,
    and the gradients of x, the factors and base_out back in their fp32 within bf16 rounding too."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = (t.float() for t in _factors(R, m1, n1, m2, n2, seed=10))
    gen = torch.Generator().manual_seed(11)
    x, base = torch.randn(64, d_in, generator=gen), torch.randn(64, d_out, generator=gen)
    upstream = torch.randn(64, d_out, generator=gen)
    results = []
    for autocast in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, base)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = kronecker_linear_gemm(*leaves[:3], base_out=leaves[3], out_features=d_out)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((out.float(), *grads))
    (low_out, *low_grads), (high_out, *high_grads) = results
    # the op's own backward (not the engine's cast): bf16 x and fp32 factors give fp32 factor gradients
    factors = [t.clone().requires_grad_(True) for t in (A, B)]
    out = KroneckerGemmFunction.apply(x.bfloat16(), *factors, None)
    _, grad_a, grad_b, _ = out.grad_fn.apply(_full_width(upstream.bfloat16(), m1 * m2, out.shape))
    assert grad_a.dtype == grad_b.dtype == torch.float32
    torch.testing.assert_close(low_out, high_out, rtol=2e-2, atol=2e-2 * high_out.abs().max().item())
    for low, high in zip(low_grads, high_grads):
        assert ((low - high).norm() / high.norm()).item() < 2e-2


@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST_CROPPED])  # B first, A first (cropped output)
def test_compiles_as_one_graph_and_matches_eager(shape: tuple) -> None:
    """torch.compile (aot_eager traces forward and backward, fullgraph: no graph break) gives eager's output and
    gradients of x, A, B and base_out."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = (t.float() for t in _factors(R, m1, n1, m2, n2, seed=12))
    gen = torch.Generator().manual_seed(13)
    x, base, upstream = (torch.randn(9, d, generator=gen) for d in (d_in, d_out, d_out))

    def step(op: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, base)]
        out = op(*leaves[:3], base_out=leaves[3], out_features=d_out)
        return [out, *torch.autograd.grad(out, leaves, upstream)]

    torch._dynamo.reset()
    compiled = step(torch.compile(kronecker_linear_gemm, backend="aot_eager", fullgraph=True))
    eager = step(kronecker_linear_gemm)
    want = [x @ _dense(A.double(), B.double(), d_out, d_in).T.float() + base]  # the eager run is not vacuous
    torch.testing.assert_close(eager[0], want[0], rtol=1e-5, atol=1e-5)
    for got, ref in zip(compiled, eager):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _graph_names(out: torch.Tensor) -> set[str]:
    names, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, SHAPES[2], SHAPES[5]])
def test_public_torch_backend_on_cpu_runs_this_op(shape: tuple, with_base: bool) -> None:
    """`kernels.kronecker_linear(..., backend="torch")` on CPU tensors is `kronecker_linear_gemm`: the same output and
    gradients bit for bit, through its node, and within 1e-12 of `kronecker_linear_reference` in float64."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=14)
    gen = torch.Generator().manual_seed(15)
    x, base = torch.randn(3, 4, d_in, dtype=F64, generator=gen), torch.randn(3, 4, d_out, dtype=F64, generator=gen)
    upstream = torch.randn(3, 4, d_out, dtype=F64, generator=gen)
    results = []
    for op in (K.kronecker_linear, kronecker_linear_gemm, K.kronecker_linear_reference):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
        kwargs = dict(backend="torch") if op is K.kronecker_linear else {}
        out = op(*leaves, base_out=base if with_base else None, out_features=d_out, **kwargs)
        if op is K.kronecker_linear:
            assert "KroneckerGemmFunctionBackward" in _graph_names(out)
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    public, gemm, reference = results
    for p, g, r in zip(public, gemm, reference):
        assert torch.equal(p, g)
        torch.testing.assert_close(p, r, atol=1e-12, rtol=0)


@pytest.mark.parametrize("op", [kronecker_linear_gemm, kronecker_linear_bmm])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("tokens", [6, 0])
@pytest.mark.parametrize("shape", [B_FIRST, A_FIRST, B_FIRST_CROPPED, A_FIRST_CROPPED, (1, 6, 4, 1, 3, 6, 12)])
def test_output_can_be_modified_in_place(op: Callable[..., torch.Tensor], shape: tuple, tokens: int,
                                         with_base: bool) -> None:
    """The torch ops' output is not a view made inside their autograd node (which autograd forbids to modify), so a
    following in-place op (ReLU(inplace=True), `out += …`) works, with the gradients of the dense formula; also where
    a layout change is a no-op (m2 = 1, no tokens)."""
    R, m1, n1, m2, n2, d_out, d_in = shape
    A, B = _factors(R, m1, n1, m2, n2, seed=16)
    gen = torch.Generator().manual_seed(17)
    x, base = torch.randn(tokens, d_in, dtype=F64, generator=gen), torch.randn(tokens, d_out, dtype=F64, generator=gen)
    upstream = torch.randn(tokens, d_out, dtype=F64, generator=gen)
    results = []
    for run in (op, lambda *a, **k: K.kronecker_linear_reference(*a, **k)):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
        out = run(*leaves, base_out=base if with_base else None, out_features=d_out)
        out.mul_(2.0).relu_()
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("function", [KroneckerGemmFunction, KroneckerBmmFunction])
def test_direct_apply_names_a_base_out_off_x_leading_axes(function: type[torch.autograd.Function]) -> None:
    """Applied directly, an op takes base_out only over x's leading axes (its gradient is dY as it comes): other
    leading axes with the same rows raise a ValueError naming base_out and the fix, while the op's wrapper lays such a
    base_out out itself and matches the einsum reference, output and every gradient, base_out's in its own shape."""
    R, m1, n1, m2, n2, d_out, d_in = B_FIRST
    A, B = _factors(R, m1, n1, m2, n2, seed=18)
    x = torch.randn(2, 3, d_in, dtype=F64)
    base = torch.randn(6, d_out, dtype=F64)
    with pytest.raises(ValueError, match=r"base_out \(6, .*must be \(2, 3, .*kronecker_linear"):
        function.apply(x, A, B, base)
    wrapper = kronecker_linear_gemm if function is KroneckerGemmFunction else kronecker_linear_bmm
    upstream = torch.randn(2, 3, d_out, dtype=F64)
    results = []
    for run in (wrapper, lambda x, A, B, base_out: K.kronecker_linear_reference(x, A, B, base_out=base_out.view(
            2, 3, d_out))):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, base)]
        out = run(*leaves[:3], base_out=leaves[3])
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    assert results[0][4].shape == base.shape
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
