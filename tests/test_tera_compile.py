"""TeRA under torch.compile: the default layout's paths trace as one graph (fullgraph=True), every path trains to
the same numbers as eager, and a real small model with TeRA adapters has no more graph breaks than the model alone.
Compiling is the standard fix for host-bound small ops (TeRA's per-layer network, benchmarks/results/tera_gpu.md),
so a graph break in the adapter would cost every layer. The `aot_eager` backend traces forward and backward like
inductor without generating code, so these run in seconds on CPU."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import specpeft
from adapter_matrix import perturb
from specpeft import TeRAConfig

# config overrides, tokens -> the path that runs (asserted below), whether it traces as one graph. The dΔ/projected
# plans (layouts with R_N > 1, quantized bases) take their vector gradients with torch.autograd.grad inside the
# backward, which dynamo does not trace: one graph break per layer, run eagerly, same numbers.
PATHS = {
    "factored P ⊗ M_N": (dict(), 12, "factored", True),
    "merged, Kronecker grads": (dict(forward_mode="materialized"), 12, "kronecker", True),
    "merged, dΔ/projected grads": (dict(forward_mode="materialized", rank=4), 12, "dense|projected", False),
    "factored tucker_apply": (dict(forward_mode="factored", rank=4), 12, "factored", True),
}


def _model(**overrides) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 512))
    model = specpeft.get_adapter_model(base, TeRAConfig(target_modules=["0", "2"], **overrides))
    perturb(model, 0.3)
    return model


def _step(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    trainables = [p for p in model.parameters() if p.requires_grad]
    return [out, *torch.autograd.grad(out, [x, *trainables], upstream)]


@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_path_compiles_and_matches_eager(path: str) -> None:
    overrides, tokens, expected, fullgraph = PATHS[path]
    model = _model(**overrides)
    layer = next(m for m in model.modules() if hasattr(m, "use_factored"))
    ran = "factored" if layer.use_factored(tokens) else layer.grad_plan(tokens)
    assert ran in expected.split("|")
    x, upstream = torch.randn(tokens, 256), torch.randn(tokens, 512)
    eager = _step(model, x, upstream)
    torch._dynamo.reset()
    compiled = _step(torch.compile(model, backend="aot_eager", fullgraph=fullgraph), x, upstream)  # True: no break
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["factored P ⊗ M_N", "merged, Kronecker grads"])
def test_default_layout_compiles_under_bf16_autocast_like_eager(path: str) -> None:
    """The network and the merged op pin fp32 inside the caller's autocast; traced, that region must survive into
    the backward (the vector gradients came out in bf16, 1.6e-2 off, when it did not)."""
    overrides, tokens, _, _ = PATHS[path]
    model = _model(**overrides)
    x, upstream = torch.randn(tokens, 256), torch.randn(tokens, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _step(model, x, upstream)
        torch._dynamo.reset()
        compiled = _step(torch.compile(model, backend="aot_eager", fullgraph=True), x, upstream)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_llama_with_tera_has_no_more_graph_breaks_than_llama() -> None:
    from transformers import LlamaConfig, LlamaModel

    def llama() -> nn.Module:  # 256 wide: the default layout P ⊗ M_N (smaller layers fall back to tucker_apply)
        torch.manual_seed(0)
        return LlamaModel(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128))

    ids = torch.randint(0, 128, (2, 12))
    torch._dynamo.reset()
    alone = torch._dynamo.explain(llama())(input_ids=ids).graph_break_count
    config = TeRAConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapted = specpeft.get_adapter_model(llama(), config)
    assert all(layer.edge_kronecker for layer in adapted.modules() if hasattr(layer, "edge_kronecker"))
    torch._dynamo.reset()
    assert torch._dynamo.explain(adapted)(input_ids=ids).graph_break_count == alone


def test_compiled_merged_path_saves_no_dense_weight() -> None:
    """Traced, the merged path's backward rebuild of W + Δ would merge with the forward's and be saved (one m×n
    tensor per layer); the only weight-sized tensors saved for backward are the frozen weights themselves."""
    model = _model(forward_mode="materialized")
    frozen = {p.data_ptr() for name, p in model.named_parameters() if name.endswith("base_layer.weight")}
    saved: list[bool] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= 256 * 256:
            saved.append(t.data_ptr() in frozen)
        return t

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled(torch.randn(12, 256, requires_grad=True))
    assert saved and all(saved)


class _GemmCounter(TorchDispatchMode):
    """Counts mm / addmm calls by their operand shapes; a batch-1 bmm counts as the mm it is (eager and traced
    code lower a (1, p, q) @ (q, r) matmul to either)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.calls[shapes] += 1
        elif func is torch.ops.aten.bmm.default and shapes[0][0] == 1:
            self.calls[tuple(shape[1:] for shape in shapes)] += 1
        return func(*args, **(kwargs or {}))


def test_compiled_merged_backward_runs_the_eager_gemms() -> None:
    """The recompute region keeps the layer's GEMM output (GELU's backward needs it): the compiled backward runs the
    same GEMMs as eager, not the forward GEMM a second time."""
    model = _model(forward_mode="materialized")
    x, upstream = torch.randn(256, 256, requires_grad=True), torch.randn(256, 512)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    counts = []
    for run in (model, compiled):
        out = run(x)
        with _GemmCounter() as counter:
            out.backward(upstream)
        counts.append(counter.calls)
    assert counts[1] == counts[0]
