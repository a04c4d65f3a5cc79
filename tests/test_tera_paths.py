"""TeRA's forward paths (factored P ⊗ M_N, merged with Kronecker factor gradients, merged with dΔ or projected
gradients) against float64 references, and the token-count rule that picks among them (tests/test_tera.py holds the
method's math, layouts, sharing and saving)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

import specpeft
from adapter_matrix import perturb
from specpeft import FrozenBase, LayerGeometry, TeRAConfig
from specpeft.adapters import tera_function
from test_tera import _adapter, _reference_delta


@pytest.mark.parametrize("mode", ["auto", "materialized"])
@pytest.mark.parametrize(("d_out", "d_in"), [(256, 256), (512, 256), (256, 1024)])
def test_default_layout_equals_the_float64_reference_end_to_end(d_out: int, d_in: int, mode: str) -> None:
    """Both paths of the default layout, P ⊗ M_N applied to x (auto at 12 tokens) and the merged W + P ⊗ M_N with
    the Kronecker factor gradients: output and gradients equal autograd through the Kronecker-sum formula (float64),
    a quantized-style base (x Δᵀ added to base(x)) too, and save → reload reproduces it exactly."""
    adapter = _adapter(d_out, d_in, alpha=0.8, forward_mode=mode)
    assert adapter.edge_kronecker and adapter.shape.ranks[-1] == 1 and adapter.kronecker_capable
    assert adapter.use_factored(12) == (mode == "auto")
    base = nn.Linear(d_in, d_out).double().requires_grad_(False)
    x = torch.randn(3, 4, d_in, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in adapter.named_parameters()]
    for quantized in (False, True):
        frozen = FrozenBase(base)
        if quantized:
            frozen.geometry = LayerGeometry("linear", (d_out, d_in), quantized=True, standard_forward=False)
        out = adapter(x, frozen)
        with torch.no_grad():  # same path, same bits without autograd
            assert torch.equal(adapter(x, frozen), out)
            delta_ref = _reference_delta(adapter)
            torch.testing.assert_close(adapter.delta_forward(x, frozen), x @ delta_ref.T, atol=1e-12, rtol=0)
        leaves = {n: v.detach().clone().requires_grad_(True) for n, v in adapter.named_parameters()}
        x_ref = x.detach().clone().requires_grad_(True)
        reference = nn.functional.linear(x_ref, base.weight + _reference_delta(adapter, leaves), base.bias)
        torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)
        upstream = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *adapter.parameters()], upstream)
        want = torch.autograd.grad(reference, [x_ref, *(leaves[n] for n in names)], upstream)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9)
    torch.manual_seed(0)
    config = TeRAConfig(target_modules=["0"], forward_mode=mode)
    model = specpeft.get_adapter_model(nn.Sequential(nn.Linear(d_in, d_out)), config)
    perturb(model, 0.3)
    inputs = torch.randn(5, d_in)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        torch.manual_seed(0)
        reloaded = specpeft.load_adapter_model(nn.Sequential(nn.Linear(d_in, d_out)), tmp)
        assert torch.equal(reloaded(inputs), model(inputs))


def test_trainable_base_bias_keeps_its_gradient() -> None:
    """A base whose bias trains cannot take the hand-written merged paths (they return no base gradients): the layer
    falls back to autograd through the base op, and the bias gets exactly the reference gradient."""
    base = nn.Linear(256, 256).double()
    base.weight.requires_grad_(False)
    adapter = _adapter(256, 256, forward_mode="materialized")
    assert adapter.grad_plan(12) == "kronecker"
    x = torch.randn(12, 256, dtype=torch.float64)
    got = torch.autograd.grad(adapter(x, FrozenBase(base)).sum(), [base.bias, *adapter.vectors()])
    names = [name for name, _ in adapter.named_parameters()]
    leaves = {n: v.detach().clone().requires_grad_(True) for n, v in adapter.named_parameters()}
    reference = nn.functional.linear(x, base.weight + _reference_delta(adapter, leaves), base.bias)
    want = torch.autograd.grad(reference.sum(), [base.bias, *(leaves[n] for n in names)])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9)


def test_merged_kronecker_path_under_autocast_keeps_fp32_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the merged path's GEMMs run in bf16, but P, M_N are formed and their gradients contracted
    in the vectors' fp32 (bf16 there would round the trained quantities themselves)."""
    from specpeft.kernels import kronecker_torch

    seen: list[tuple[torch.dtype, ...]] = []
    original = kronecker_torch.kronecker_factor_grads

    def spy(x, grad_y, a, b, need_a=True, need_b=True, dtype=None):
        seen.append((a.dtype, b.dtype, dtype))
        return original(x, grad_y, a, b, need_a, need_b, dtype)

    monkeypatch.setattr(kronecker_torch, "kronecker_factor_grads", spy)
    base = nn.Linear(256, 256).requires_grad_(False)
    adapter = _adapter(256, 256, dtype=torch.float32, forward_mode="materialized")
    x = torch.randn(16, 256)
    grads = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = adapter(x, FrozenBase(base))
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        grads.append(torch.autograd.grad(out.float().pow(2).sum(), adapter.vectors()))
    assert seen == [(torch.float32, torch.float32, torch.float32)] * 2
    for low, high in zip(grads[1], grads[0]):
        assert ((low - high).norm() / high.norm()).item() < 3e-2


EDGE = dict(rank=[2, 2, 1], mode_sizes={"12x20": [[3, 1, 4], [2, 2, 5]]})  # R_3 = 1: Δ = P (3×4) ⊗ M_3 (4×5)


@pytest.mark.parametrize("layout", ["tucker", "edge"])
@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_forward_and_gradients_equal_dense(mode: str, layout: str) -> None:
    base = nn.Linear(20, 12).double().requires_grad_(False)
    cfg = EDGE if layout == "edge" else dict(rank=[3, 2, 2])
    adapter = _adapter(12, 20, forward_mode=mode, alpha=1.3, **cfg)
    assert adapter.edge_kronecker == (layout == "edge")
    x = torch.randn(2, 5, 20, dtype=torch.float64, requires_grad=True)
    out = adapter(x, FrozenBase(base))
    torch.testing.assert_close(out, nn.functional.linear(x, base.weight + _reference_delta(adapter), base.bias),
                               atol=1e-12, rtol=0)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *adapter.vectors()], upstream)
    x_ref = x.detach().clone().requires_grad_(True)
    reference = nn.functional.linear(x_ref, base.weight + adapter._build(*adapter.vectors()), base.bias)
    expected = torch.autograd.grad(reference, [x_ref, *adapter.vectors()], upstream)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)
    delta_term = adapter.delta_forward(x, FrozenBase(base))
    torch.testing.assert_close(delta_term, x @ _reference_delta(adapter).T, atol=1e-12, rtol=0)


EDGE_2 = dict(tensor_order=2, rank=[2, 1], mode_sizes={"4x6": [[2, 2], [2, 3]]})  # Δ = P (2×2) ⊗ M_2 (2×3)


@pytest.mark.parametrize(("mode", "cfg"), [("factored", dict(tensor_order=2, rank=2)), ("materialized", dict(rank=2)),
                                         ("factored", EDGE_2)])
def test_gradcheck(mode: str, cfg: dict) -> None:
    """Spec §1.9 check 10 on λ, μ and x, through the forward the model runs (custom backward when materialized,
    `kernels.kronecker_linear` for the rank-1 last mode)."""
    base = nn.Linear(6, 4).double().requires_grad_(False)
    adapter = _adapter(4, 6, forward_mode=mode, **cfg)
    assert mode == "materialized" or adapter.edge_kronecker == (cfg is EDGE_2)
    names = [name for name, _ in adapter.named_parameters()]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    vectors = tuple(v.detach().clone().requires_grad_(True) for v in adapter.vectors())

    def run(inp: torch.Tensor, *vecs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(adapter, dict(zip(names, vecs)), (inp, FrozenBase(base)))

    assert torch.autograd.gradcheck(run, (x, *vectors))
    assert torch.autograd.gradgradcheck(lambda *vecs: adapter._build(*vecs), vectors)


@pytest.mark.parametrize("plan", ["dense", "projected"])
@pytest.mark.parametrize("dims, cfg", [
    ((12, 20), dict(rank=[3, 2, 2])),  # modes (3, 2, 2) × (5, 2, 2)
    ((24, 40), dict(rank=4, tensor_order=2, alpha=0.6)),
    ((60, 24), dict(rank=1, mode_sizes={"60x24": [[4, 3, 5], [2, 4, 3]]})),  # one Kronecker product
    ((20, 12), dict(rank=[2, 3, 2], scale_sides="rank")),
])
@pytest.mark.parametrize("merge_base, large", [(True, False), (True, True), (False, False)])
def test_hand_written_backward_equals_dense_autograd(plan: str, dims, cfg: dict, merge_base: bool, large: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both vector-gradient plans of the merged-weight path (dense dΔ contraction, projected without dΔ) and dX
    equal autograd through y = x (W + Δ_ref)ᵀ + b, Δ_ref the float64 Kronecker-sum formula (spec §1.2); `large`
    forces the single-buffer W₀ + Δ build used from 2²² weight entries."""
    d_out, d_in = dims
    if large:
        monkeypatch.setattr(tera_function, "LARGE_WEIGHT", 0)
    base = nn.Linear(d_in, d_out).double().requires_grad_(False)
    adapter = _adapter(d_out, d_in, forward_mode="materialized", **cfg)
    monkeypatch.setattr(adapter, "grad_plan", lambda tokens: plan)
    frozen = FrozenBase(base)
    if not merge_base:  # a quantized base: the adapter adds x Δᵀ to the base output
        frozen.geometry = LayerGeometry("linear", (d_out, d_in), quantized=True, standard_forward=False)
    x = torch.randn(3, 7, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = adapter(x, frozen)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [x, *adapter.vectors()], upstream)
    names = [name for name, _ in adapter.named_parameters()]
    vectors = [v.detach().clone().requires_grad_(True) for v in adapter.vectors()]
    x_ref = x.detach().clone().requires_grad_(True)
    originals = [v.detach().clone() for v in adapter.vectors()]
    reference_delta = _reference_delta(adapter, dict(zip(names, vectors)))
    reference = nn.functional.linear(x_ref, base.weight + reference_delta, base.bias)
    expected = torch.autograd.grad(reference, [x_ref, *vectors], upstream)
    torch.testing.assert_close(out, reference.detach(), atol=1e-12, rtol=0)
    for got, want in zip(grads, expected):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-10)
    assert all(torch.equal(v, o) for v, o in zip(adapter.vectors(), originals))


@pytest.mark.parametrize("plan", ["dense", "projected"])
@pytest.mark.parametrize("quantized", [False, True])
def test_materialized_forward_saves_no_dense_delta(quantized: bool, plan: str, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    """Autograd must not keep an m×n tensor alive between forward and backward (ΔW is rebuilt in backward)."""
    d_out, d_in = 64, 96
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    adapter = _adapter(d_out, d_in, dtype=torch.float32, forward_mode="materialized")
    monkeypatch.setattr(adapter, "grad_plan", lambda tokens: plan)
    frozen = FrozenBase(base)
    if quantized:
        frozen.geometry = LayerGeometry("linear", (d_out, d_in), quantized=True, standard_forward=False)
    saved: list[tuple[int, int]] = []
    x = torch.randn(4, d_in, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.numel(), t.data_ptr())) or t, lambda t: t):
        out = adapter(x, frozen)
    # The base's own frozen weight may be saved by the base op (no new memory); nothing else of size m·n.
    new_tensors = [numel for numel, ptr in saved if ptr != base.weight.data_ptr()]
    assert new_tensors and max(new_tensors) < d_out * d_in, saved
    out.sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in adapter.vectors())


@pytest.mark.parametrize("plan", ["dense", "projected", "kronecker", "factored"])
@pytest.mark.parametrize("large", [False, True])
def test_float64_base_with_float32_vectors(plan: str, large: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 base with the adapter's fp32 vectors (what `get_adapter_model` builds on a .double() model) runs every
    plan, both weight-size branches of the dense contraction: output and vector gradients match the float64
    Kronecker-sum reference to fp32 accuracy. (The large dense branch once mixed fp64 dΔ with fp32 factors.)"""
    if large:
        monkeypatch.setattr(tera_function, "LARGE_WEIGHT", 0)
    d_out, d_in = 60, 24
    base = nn.Linear(d_in, d_out).double().requires_grad_(False)
    adapter = _adapter(d_out, d_in, dtype=torch.float32, forward_mode="factored" if plan == "factored" else "materialized")
    if plan != "factored":
        monkeypatch.setattr(adapter, "grad_plan", lambda tokens: plan)
    x = torch.randn(9, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = adapter(x, FrozenBase(base))
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, adapter.vectors(), upstream)
    names = [name for name, _ in adapter.named_parameters()]
    vectors = [v.detach().double().requires_grad_(True) for v in adapter.vectors()]
    reference = nn.functional.linear(x, base.weight + _reference_delta(adapter, dict(zip(names, vectors))), base.bias)
    expected = torch.autograd.grad(reference, vectors, upstream)
    torch.testing.assert_close(out.double(), reference.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_auto_mode_picks_by_token_count() -> None:
    """The winners measured in benchmarks/results/tera_speed.md ("factored forced" / "merged forced" rows): factored
    for few tokens and for a Kronecker Δ; R = 16 on every mode merges for many tokens; the default layout
    (Δ = P ⊗ M_N) is factored at 4096² up to ~1K tokens and merged (Kronecker factor gradients, no dΔ) beyond, and
    merged at 384² from ~130 tokens (`test_default_layout_switches_where_chained_layers_measured_it`)."""
    adapter = _adapter(4096, 4096, dtype=torch.float32, rank=16)
    assert adapter.use_factored(1) and adapter.use_factored(8)
    assert not adapter.use_factored(512) and not adapter.use_factored(4096)
    default = _adapter(4096, 4096, dtype=torch.float32)
    assert default.kronecker_capable and default.grad_plan(4096) == "kronecker"
    assert all(default.use_factored(t) for t in (1, 512, 1024)) and not default.use_factored(4096)
    assert _adapter(4096, 4096, dtype=torch.float32, rank=1).use_factored(512)
    assert not _adapter(384, 384, dtype=torch.float32, rank=1).use_factored(2048)
    assert not any(_adapter(384, 384, dtype=torch.float32).use_factored(t) for t in (256, 1024, 4096))


def test_default_layout_switches_where_chained_layers_measured_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`KRONECKER_APPLY_PENALTY` scales the factored estimate of every layer applying Δ = P ⊗ M_N, a quantized base's
    too, and nothing else: the merged plans and a layout applied by `tucker_apply` (R = 16) cost the same without it.
    With it the CPU rule merges where chains of adapted layers measured merged faster (benchmarks/results/
    tera_switch.md): MiniLM's 384² at 256 tokens (from 131 on), its 1536×384 at 256 (from 213), its 384×1536 at 512
    (from 377; unscaled, factored to 679), while a 4096² layer stays factored at 1,024 tokens."""
    from specpeft.init import tucker_cost

    default, other = _adapter(384, 1536, dtype=torch.float32), _adapter(384, 1536, dtype=torch.float32, rank=16)
    quantized = _quantized_adapter(384, 1536)
    assert default.edge_kronecker and quantized.edge_kronecker and not quantized.kronecker_capable
    assert not other.edge_kronecker
    layers = (default, other, quantized)
    scaled = [layer._step_costs(512)[0] for layer in layers]
    assert not default.use_factored(512)
    penalty = tucker_cost.KRONECKER_APPLY_PENALTY
    assert penalty > 1.0
    monkeypatch.setattr(tucker_cost, "KRONECKER_APPLY_PENALTY", 1.0)
    for layer, costs in zip(layers, scaled):
        layer._costs_by_tokens.clear()
        unscaled = layer._step_costs(512)[0]
        factor = penalty if layer.edge_kronecker else 1.0
        assert unscaled.keys() == costs.keys() and costs["factored"] == pytest.approx(factor * unscaled["factored"])
        assert all(costs[plan] == unscaled[plan] for plan in costs if plan != "factored")
    assert default.use_factored(512)  # the unscaled model's choice
    monkeypatch.undo()
    for d_out, d_in in ((384, 384), (1536, 384)):
        layer = _adapter(d_out, d_in, dtype=torch.float32)
        assert layer.use_factored(64) and not layer.use_factored(256), (d_out, d_in)
    assert _adapter(4096, 4096, dtype=torch.float32).use_factored(1024)


def test_cuda_runs_the_default_layout_factored_from_a_token_count() -> None:
    """On CUDA a plain linear with the default layout (Δ = P ⊗ M_N) is factored from `CUDA_FACTORED_TOKENS` tokens
    and merged below (the H100 winners in benchmarks/results/tera_gpu.md); other layouts and bases whose merged path
    is not the Kronecker merged op (a quantized one) keep the cost model's choice, and "materialized" / "factored"
    still force their path."""
    from specpeft.init.tucker_cost import CUDA_FACTORED_TOKENS as threshold

    default = _adapter(4096, 4096, dtype=torch.float32)
    assert default.edge_kronecker and not default.use_factored(threshold)  # the CPU model merges there
    assert all(default.use_factored(t, "cuda") for t in (threshold, 4 * threshold))
    assert not any(default.use_factored(t, "cuda") for t in (1, threshold - 1))
    for other in (_adapter(4096, 4096, dtype=torch.float32, rank=16), _quantized_adapter(4096, 4096)):
        assert [other.use_factored(t, "cuda") for t in (8, 1024, 4096)] == [other.use_factored(t) for t in (8, 1024, 4096)]
    assert not _adapter(4096, 4096, dtype=torch.float32, forward_mode="materialized").use_factored(1 << 16, "cuda")
    assert _adapter(4096, 4096, dtype=torch.float32, forward_mode="factored").use_factored(1, "cuda")


def _quantized_adapter(d_out: int, d_in: int):
    """The default layout on a quantized base geometry: its merged alternative is not the Kronecker merged op."""
    from specpeft.adapters.tera import TeRAAdapter

    geometry = LayerGeometry("linear", (d_out, d_in), quantized=True, standard_forward=False)
    return TeRAAdapter.create(geometry, TeRAConfig(target_modules=["x"]), None, None, name="x")


def test_factored_default_layout_trains_under_bf16_autocast() -> None:
    """The factored Kronecker path under bf16 autocast (the standard mixed-precision recipe; the default layout at few
    tokens): the network node keeps its fp32 diagonals' dtype in forward and backward, and the vector gradients match
    the fp32 step to bf16 accuracy, with backward called inside or outside the autocast region."""
    torch.manual_seed(0)
    base = nn.Linear(256, 256).requires_grad_(False)
    adapter = _adapter(256, 256, dtype=torch.float32)
    assert adapter.use_factored(8)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    reference = torch.autograd.grad(adapter(x, FrozenBase(base)).square().sum(), adapter.vectors())
    for backward_inside in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = adapter(x, FrozenBase(base)).float().square().sum()
            grads = torch.autograd.grad(loss, adapter.vectors()) if backward_inside else None
        grads = grads or torch.autograd.grad(loss, adapter.vectors())
        for got, want in zip(grads, reference):
            assert got.dtype == torch.float32
            assert ((got - want).norm() / want.norm()).item() < 5e-2


@pytest.mark.parametrize("layer, rank, tokens, mode", [
    pytest.param((64, 48), None, 8, "auto", id="default-small-layer-factored"),
    pytest.param((96, 96), 4, 8, "factored", id="rank4-factored"),
    pytest.param((96, 96), [8, 8, 2], 512, "auto", id="ranks-auto-many-tokens"),
    pytest.param((96, 96), 4, 8, "materialized", id="rank4-merged"),
    pytest.param("conv", 4, 0, "auto", id="conv2d"),
])
def test_every_path_trains_under_bf16_autocast(layer, rank, tokens: int, mode: str) -> None:
    """Layouts beyond the default's Kronecker edge (mode-by-mode contraction, the merged plans) and convolutions,
    under bf16 autocast with backward outside it: the step runs (each mode product once came out in its own dtype),
    and the vector gradients are fp32 and match the fp32 step to bf16 accuracy."""
    torch.manual_seed(0)
    if layer == "conv":
        base, x = nn.Conv2d(3, 8, 3), torch.randn(2, 3, 8, 8)
    else:
        base, x = nn.Linear(layer[1], layer[0]), torch.randn(tokens, layer[1])
    model = specpeft.get_adapter_model(nn.Sequential(base), TeRAConfig(target_modules=["0"], rank=rank,
                                                                        forward_mode=mode))
    perturb(model, 0.2)
    vectors = [p for p in model.parameters() if p.requires_grad]
    reference = torch.autograd.grad(model(x).square().sum(), vectors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().sum()
    for got, want in zip(torch.autograd.grad(loss, vectors), reference):
        assert got.dtype == torch.float32
        assert ((got - want).norm() / want.norm()).item() < 5e-2


@pytest.mark.parametrize("mode", ["auto", "materialized"])
def test_default_layout_trains_under_hf_gradient_checkpointing(mode: str) -> None:
    """transformers' `gradient_checkpointing_enable()` (non-reentrant: every saved tensor unpacks once) on a Llama
    with the default layout, factored (auto at 24 tokens) and merged: the step runs and its gradients equal the
    step without checkpointing (the network's backward once read its saved tensors twice and raised)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def step(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=128))
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = specpeft.get_adapter_model(model, TeRAConfig(target_modules=targets, forward_mode=mode))
        perturb(model, 0.3)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for got, want in zip(step(True), step(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
