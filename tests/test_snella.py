"""SNELLA adapter: spec §3.9 self-checks against float64 / torch.cdist references, and the foundation matrix.

The Triton-path tests (`test_triton_path_*`) run the kernels in the Triton interpreter on CPU (compiled on CUDA); the
interpreter needs TRITON_INTERPRET=1 before triton is first imported, hence `triton_guard` first.
"""

import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from triton_guard import DEVICE, interpreter_child_test, needs_triton  # noqa: I001

import specpeft  # noqa: E402
import specpeft.kernels as kernels  # noqa: E402
from adapter_matrix import CHECKS, MODEL_CASES, MLP, MethodCase, perturb, run_check  # noqa: E402
from specpeft import FrozenBase, LayerGeometry, SNELLAConfig  # noqa: E402
from specpeft.adapters.snella import SNELLAAdapter  # noqa: E402
from specpeft.adapters.snella_allocator import snella_layers  # noqa: E402
from specpeft.adapters import snella_kernel  # noqa: E402
from specpeft.adapters.snella_function import LayerPlan, snella_apply  # noqa: E402
from specpeft.adapters.snella_kernel import (  # noqa: E402
    KernelSpec,
    effective_kernel,
    kept_count,
    kernel_block,
    kernel_matrix,
    kth_smallest,
    topk_mask,
)


TRAINABLE = {"in_qs", "out_qs", "alpha", "gamma", "beta", "scale"}
CASE = MethodCase(
    make_config=lambda targets: SNELLAConfig(target_modules=targets, low_rank_dim=4, init_sparsity=0.3),
    trainable=TRAINABLE,
    perturb_scale=0.5,  # the default 0.1 moves the ~1e-4-sized code-mode K_eff too little to see in the output
)


@pytest.mark.parametrize("model_name", list(MODEL_CASES))
@pytest.mark.parametrize("check", list(CHECKS))
def test_matrix(check: str, model_name: str) -> None:
    run_check(check, CASE, model_name)


def _adapter(m: int, n: int, seed: int = 0, **cfg) -> SNELLAAdapter:
    torch.manual_seed(seed)
    config = SNELLAConfig(target_modules=["x"], **cfg)
    return SNELLAAdapter.create(LayerGeometry("linear", (m, n)), config, torch.zeros(m, n), None, name="x")


def _reference_kernel(adapter: SNELLAAdapter) -> torch.Tensor:
    """The reference code's (n, m) kernel in float64: Σ c_h cdist(In_h, Out_h) + α softmax(·/γ, dim=-1) + β."""
    A, B = adapter.in_qs.double().detach(), adapter.out_qs.double().detach()
    coeff = torch.tensor(adapter.spec.coeffs, dtype=torch.float64)[:, None, None]
    D = (coeff * torch.cdist(A, B, p=2)).sum(0)  # (H, n, r), (H, m, r) -> (n, m)
    if adapter.spec.kernel == "snell":
        return D
    alpha, gamma, beta = (float(t.detach()) for t in (adapter.alpha, adapter.gamma, adapter.beta))
    return D + alpha * torch.softmax(D / gamma, dim=-1) + beta


# -- kernel (self-checks 1, 2) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["snella", "snell"])
def test_kernel_matches_reference_formula(kernel: str) -> None:
    adapter = _adapter(96, 64, low_rank_dim=32, kernel=kernel, init_sparsity=0.0, mask_mode="binary", init_scale=1.0)
    if kernel == "snella":
        with torch.no_grad():
            adapter.alpha.fill_(0.7)
            adapter.gamma.fill_(0.05)  # a sharp softmax, so the α term is far from uniform
            adapter.beta.fill_(0.02)
    ref = _reference_kernel(adapter)  # (in, out)
    assert (adapter.kernel_matrix().double() - ref.T).abs().max() < 1e-6
    x = torch.randn(5, 64, dtype=torch.float64)
    y = adapter.delta_forward(x.float(), None).double()  # sparsity 0, binary mask, s = 1: x K_ref
    torch.testing.assert_close(y, x @ ref, atol=1e-5, rtol=1e-5)  # the reference's F.linear(x, K.T) orientation


def test_init_magnitudes() -> None:
    adapter = _adapter(96, 64, low_rank_dim=32)
    D, P, _, _ = kernel_block(adapter.in_qs, adapter.out_qs, adapter.alpha, adapter.gamma, adapter.beta, adapter.spec)
    assert 5e-4 < float(D.detach().abs().mean()) < 5e-3  # spec ≈1e-3: bounds 1/√(n·16), 1/√(m·16); c = ±0.1
    torch.testing.assert_close(P.sum(0), torch.ones(64), atol=1e-6, rtol=0)  # softmax over outputs, per input
    assert abs(float(P.detach().mean()) - 1 / 96) < 1e-7


def test_init_is_exact_and_trainable() -> None:
    """s = 0 at init: output == base bit for bit, and the gate gets a non-zero gradient."""
    base = torch.nn.Linear(20, 30)
    adapter = SNELLAAdapter.create(LayerGeometry.of(base), SNELLAConfig(target_modules=["x"], low_rank_dim=4),
                                   base.weight.detach(), None)
    x = torch.randn(6, 20)
    y = adapter(x, FrozenBase(base.requires_grad_(False)))
    assert torch.equal(y, base(x))
    y.pow(2).sum().backward()
    assert adapter.scale.grad is not None and float(adapter.scale.grad.abs()) > 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bf16_autocast_step_matches_fp32(kind: str) -> None:
    """Under CPU bf16 autocast (what Trainer(bf16=True) enters) K and its top-k stay in the factors' fp32, so the mask
    is the fp32 one, and only the base op runs in bf16: output and gradients within bf16 rounding of the fp32 step."""
    torch.manual_seed(0)
    base = torch.nn.Conv2d(3, 8, 3, padding=1) if kind == "conv" else torch.nn.Linear(20, 30)
    adapter = SNELLAAdapter.create(LayerGeometry.of(base), SNELLAConfig(target_modules=["x"], low_rank_dim=4),
                                   base.weight.detach(), None)
    perturb(adapter, 0.1)
    frozen = FrozenBase(base.requires_grad_(False))
    x = torch.randn(2, 3, 6, 6) if kind == "conv" else torch.randn(6, 20)
    expected = adapter(x, frozen)
    grads = torch.autograd.grad(expected.sum(), list(adapter.parameters()))
    mask = adapter.mask()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = adapter(x, frozen)
        assert torch.equal(adapter.mask(), mask)
    assert got.dtype == torch.bfloat16 and _rel_err(got, expected) < 2e-2
    for grad, ref in zip(torch.autograd.grad(got.float().sum(), list(adapter.parameters())), grads):
        assert grad.dtype == torch.float32 and _rel_err(grad, ref) < 3e-2


# -- exact top-k (self-checks 3, 4) -----------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.01, 0.3, 0.8, 0.93])
@pytest.mark.parametrize("mode", ["code", "binary"])
def test_kept_count_is_exact(sparsity: float, mode: str) -> None:
    adapter = _adapter(96, 64, low_rank_dim=8, init_sparsity=sparsity, mask_mode=mode, init_scale=1.0)
    expected = round((1 - sparsity) * 96 * 64)
    assert int(adapter.kept) == expected
    delta = adapter.delta_weight()
    assert int((delta != 0).sum()) == expected == int(adapter.mask().sum())
    kept_abs = adapter.kernel_matrix().detach().abs()[adapter.mask()]
    dropped_abs = adapter.kernel_matrix().detach().abs()[~adapter.mask()]
    assert kept_abs.min() >= dropped_abs.max()


def test_topk_with_ties_matches_stable_sort() -> None:
    """Many equal |K| values: exactly k kept, ties resolved to the lowest flat indices (reference: stable sort)."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 7, (40, 30), generator=gen).float()  # 1200 entries, 7 distinct values
    for k in [0, 1, 150, 171, 600, 1199, 1200]:
        mask, tau, ties = topk_mask(scores, k)
        order = sorted(range(scores.numel()), key=lambda i: (-float(scores.view(-1)[i]), i))
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(mask.view(-1), expected), k
    zeros = torch.zeros(10, 10)
    assert int(topk_mask(zeros, 37)[0].sum()) == 37  # everything tied


def test_radix_select_equals_kthvalue() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.cat([torch.randn(5000, generator=gen).abs(), torch.zeros(50), torch.full((20,), 3.0),
                        torch.tensor([1e-40, float("inf"), 1e30])])  # zeros, ties, a subnormal, inf
    for t in [1, 2, 50, 51, 2500, 5060, values.numel()]:
        assert kth_smallest(values, t) == float(values.double().kthvalue(t).values), t


def test_gpu_pieces_are_larger_and_give_the_same_answers(monkeypatch) -> None:
    """CUDA uses 16x larger column blocks and 64x larger radix chunks (fewer host-side loop trips); the blocks still
    tile [0, n) in order, and the chunked radix select / tie resolution is exact at any chunk size."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    for m, n in [(4096, 4096), (4096, 11008), (11008, 4096), (768, 3072)]:
        blocks_cpu, blocks_gpu = snella_kernel.column_blocks(m, n, cpu), snella_kernel.column_blocks(m, n, cuda)
        for blocks in (blocks_cpu, blocks_gpu):
            assert blocks[0][0] == 0 and blocks[-1][1] == n and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert len(blocks_gpu) < len(blocks_cpu) or len(blocks_cpu) == snella_kernel.MIN_BLOCKS
        assert len(blocks_gpu) >= snella_kernel.MIN_BLOCKS
    gen = torch.Generator().manual_seed(2)
    values = torch.cat([torch.randn(3000, generator=gen).abs(), torch.full((40,), 0.5)])  # a tie group
    expected = {t: kth_smallest(values, t) for t in (1, 1500, 2000, 3040)}
    monkeypatch.setattr(snella_kernel, "RADIX_CHUNK", 7)  # many chunks: the CPU loop, tie search across chunks
    assert {t: kth_smallest(values, t) for t in expected} == expected
    kept = int((values > 0.5).sum()) + 20  # the cut runs through the tie group
    chunked = topk_mask(values, kept)
    assert chunked[2].numel() == 20 and int(chunked[0].sum()) == kept
    monkeypatch.setattr(snella_kernel, "RADIX_CHUNK", 1 << 20)  # one chunk
    whole = topk_mask(values, kept)
    assert torch.equal(chunked[0], whole[0]) and chunked[1] == whole[1] and torch.equal(chunked[2], whole[2])


def test_large_layer_4096x11008_exact_count() -> None:
    """A 45 M-entry layer (> 2^24, where torch.quantile refuses) keeps exactly round((1 − s)·N) entries; at this
    size fp32 |K| has duplicates at the threshold, so the count is exact only because ties are resolved."""
    adapter = _adapter(4096, 11008, low_rank_dim=2, init_sparsity=0.3, kernel="snell")  # snell: fewer passes
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(torch.empty(2**24 + 1), 0.3)  # the reference's rule fails here (spec §3.8 pitfall 1)
    assert int(adapter.kept) == round(0.7 * 4096 * 11008)
    with torch.no_grad():
        scores = adapter.kernel_matrix().abs_()
    mask, tau, tie_index = topk_mask(scores, int(adapter.kept))
    assert int(mask.count_nonzero()) == int(adapter.kept)
    assert tie_index.numel() > 0 and int((scores == tau).count_nonzero()) > tie_index.numel()  # a tie group is cut


def test_kept_count_rounding() -> None:
    assert kept_count(0.3, 10) == 7 and kept_count(0.25, 10) == 8 and kept_count(0.0, 9) == 9  # ⌊x + ½⌋
    assert kept_count(1.0, 9) == 0 and kept_count(0.8, 4096 * 4096) == 3355443


# -- gradients (self-check 6) and memory ------------------------------------------------------------------------


def _weighted_delta_loss(adapter: SNELLAAdapter, C: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of Σ C ⊙ Δ taken through the training Function (x = I makes y = Δᵀ)."""
    adapter.zero_grad()
    m, n = adapter.geometry.matrix_shape
    y = adapter.delta_forward(torch.eye(n), None)  # (n, n) @ Δᵀ -> (n, m)
    (y * C.T).sum().backward()
    return {k: p.grad.clone() for k, p in adapter.named_parameters()}


@pytest.mark.parametrize("mode", ["code", "binary"])
def test_gradients_flow_only_through_kept_entries(mode: str) -> None:
    adapter = _adapter(12, 10, low_rank_dim=4, init_sparsity=0.6, mask_mode=mode, init_scale=1.0)
    mask = adapter.mask()
    C = torch.randn(12, 10)
    grads = _weighted_delta_loss(adapter, C)
    dropped, kept = torch.nonzero(~mask)[0], torch.nonzero(mask)[0]
    C_dropped = C.clone()
    C_dropped[tuple(dropped)] += 5.0
    for name, g in _weighted_delta_loss(adapter, C_dropped).items():
        assert torch.equal(g, grads[name]), name  # a masked-out entry's loss weight cannot reach any factor
    C_kept = C.clone()
    C_kept[tuple(kept)] += 5.0
    assert not torch.equal(_weighted_delta_loss(adapter, C_kept)["in_qs"], grads["in_qs"])


def _check_function_against_autograd(geometry, x, A, B, scalars, s, weight, spec, kept) -> None:
    leaves = [t.requires_grad_(True) for t in (x, A, B, *scalars, s) if t is not None]
    plan = LayerPlan(spec, kept=kept, geometry=geometry)
    out = snella_apply(x, A, B, *scalars, s, plan, weight=weight)
    K = kernel_matrix(A, B, *scalars, spec)
    delta = (s * effective_kernel(K, topk_mask(K.detach().abs(), kept)[0], spec.mask_mode)).view(geometry.weight_shape)
    ref = geometry.apply(x, delta if weight is None else weight + delta)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kernel,p", [("snella", 2.0), ("snell", 2.0), ("snell", 1.0)])
@pytest.mark.parametrize("mode", ["code", "binary"])
@pytest.mark.parametrize("kind,fused,block_elems", [("linear", False, None), ("linear", True, None),
                                                    ("linear", True, 16), ("conv2d", False, None), ("conv2d", False, 20)])
def test_function_gradients_match_autograd_float64(kernel, p, mode, kind, fused, block_elems, monkeypatch) -> None:
    """The hand-written, block-wise backward equals autograd through the dense float64 op(x, [W0 +] s·K_eff)."""
    if block_elems is not None:  # several column blocks (the default block covers these tiny layers whole)
        monkeypatch.setattr(snella_kernel, "BLOCK_ELEMS", block_elems)
        monkeypatch.setattr(snella_kernel, "SMALL_LAYER", 0)
    torch.manual_seed(0)
    dt = torch.float64
    if kind == "linear":
        geometry, x = LayerGeometry("linear", (7, 5)), torch.randn(2, 3, 5, dtype=dt)
    else:
        geometry = LayerGeometry("conv2d", (6, 2, 3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)
        x = torch.randn(2, 4, 5, 5, dtype=dt)
    m, n = geometry.matrix_shape
    assert (len(snella_kernel.column_blocks(m, n, x.device)) > 1) == (block_elems is not None)
    A, B = torch.randn(2, n, 3, dtype=dt), torch.randn(2, m, 3, dtype=dt)
    scalars = [torch.tensor(v, dtype=dt) for v in (0.7, 1.3, 0.1)] if kernel == "snella" else [None] * 3
    weight = torch.randn(geometry.weight_shape, dtype=dt) if fused else None
    spec = KernelSpec(kernel, mode, (0.1, -0.1), p)
    _check_function_against_autograd(geometry, x, A, B, scalars, torch.tensor(0.8, dtype=dt), weight, spec,
                                     (m * n) // 2)


@pytest.mark.parametrize("kept", [3, 13, 21])
def test_function_with_tied_kernel_entries_across_blocks(kept: int, monkeypatch) -> None:
    """Duplicate input columns make whole columns of K equal: the threshold cuts through tie groups that span
    several column blocks, and forward and backward keep exactly the lowest flat indices (as `topk_mask`)."""
    monkeypatch.setattr(snella_kernel, "BLOCK_ELEMS", 8)  # m = 4: one-column blocks
    monkeypatch.setattr(snella_kernel, "SMALL_LAYER", 0)
    assert len(snella_kernel.column_blocks(4, 6, torch.device("cpu"))) > 1
    torch.manual_seed(1)
    dt = torch.float64
    A = torch.randn(2, 3, 2, dtype=dt).repeat(1, 2, 1)  # columns 0-2 repeated as 3-5: (2, 6, 2)
    B = torch.randn(2, 4, 2, dtype=dt)
    spec = KernelSpec("snell", "binary", (0.1, -0.1), 2.0)
    scores = kernel_matrix(A, B, None, None, None, spec).abs()
    assert int(topk_mask(scores, kept)[0].sum()) == kept and topk_mask(scores, kept)[2].numel() > 0  # ties cut
    _check_function_against_autograd(LayerGeometry("linear", (4, 6)), torch.randn(3, 6, dtype=dt), A, B,
                                     [None] * 3, torch.tensor(1.3, dtype=dt), None, spec, kept)


def test_kernel_is_bit_identical_in_every_path(monkeypatch) -> None:
    """The differentiable K (delta_weight), the in-place K (training forward) and the block-wise K agree bit for bit."""
    adapter = _adapter(40, 56, low_rank_dim=8)
    with torch.no_grad():
        in_place = adapter.kernel_matrix()
    assert torch.equal(adapter.kernel_matrix(), in_place)
    monkeypatch.setattr(snella_kernel, "SMALL_LAYER", 0)
    monkeypatch.setattr(snella_kernel, "BLOCK_ELEMS", 40 * 8)
    with torch.no_grad():
        blocked = adapter.kernel_matrix()
    torch.testing.assert_close(blocked, in_place, atol=1e-8, rtol=1e-6)  # other blocks: same math, any order


def _saved_numels(fn) -> list[tuple[int, int]]:
    """(numel, data_ptr) of every tensor autograd saves while `fn` runs."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_no_dense_kernel_saved_for_backward() -> None:
    m, n = 48, 40
    base = torch.nn.Linear(n, m).requires_grad_(False)
    adapter = SNELLAAdapter.create(LayerGeometry.of(base), SNELLAConfig(target_modules=["x"], low_rank_dim=4),
                                   base.weight, None)
    x = torch.randn(2, n, requires_grad=True)  # 2 tokens: x is far smaller than m·n
    for run in (lambda: adapter(x, FrozenBase(base)), lambda: adapter.delta_forward(x, None)):
        big = [(k, ptr) for k, ptr in _saved_numels(run) if k >= m * n]
        assert all(ptr == base.weight.data_ptr() for _, ptr in big), big  # only the frozen base weight itself
    naive = _saved_numels(lambda: F.linear(x, base.weight + adapter.delta_weight()))
    assert any(k >= m * n and ptr != base.weight.data_ptr() for k, ptr in naive)  # the test can fail


# -- merge and save/load (self-checks 5, 8) ---------------------------------------------------------------------


def test_merge_equals_forward_in_eval_and_unmerge_restores() -> None:
    torch.manual_seed(0)
    config = SNELLAConfig(target_modules=["lin0", "lin1"], low_rank_dim=4, init_sparsity=0.5, adapter_dropout=0.1,
                          drop_path=0.1)
    model = specpeft.get_adapter_model(MLP(), config)
    perturb(model, 0.5)
    model.eval()  # dropout and DropPath on the adapter branch are identity in eval
    x = torch.randn(5, 24)
    out = model(x)
    weights = {name: mod.weight.detach().clone() for name, mod in model.named_modules() if name.endswith("base_layer")}
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, atol=1e-6, rtol=1e-6)
    model.unmerge_adapter()
    for name, mod in model.named_modules():
        if name in weights:
            torch.testing.assert_close(mod.weight, weights[name], atol=1e-7, rtol=0)
    model.train()
    assert not torch.equal(model(x), out)  # ... and active in training


def test_save_load_preserves_per_layer_sparsity() -> None:
    torch.manual_seed(0)
    model = specpeft.get_adapter_model(MLP(), SNELLAConfig(target_modules=["lin0", "lin1"], low_rank_dim=4))
    perturb(model, 0.5)
    layers = snella_layers(model)
    layers["lin0"].set_sparsity(0.73)
    layers["lin1"].set_kept(101)
    x = torch.randn(5, 24)
    out = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = load_file(f"{tmp}/adapter_model.safetensors")
        assert sorted(int(v) for k, v in saved.items() if k.endswith("kept")) == [101, round(0.27 * 960)]
        torch.manual_seed(0)
        reloaded = specpeft.load_adapter_model(MLP(), tmp)
        torch.testing.assert_close(reloaded(x), out, atol=0, rtol=0)
        again = snella_layers(reloaded)
        assert int(again["lin0"].kept) == round(0.27 * 960) and int(again["lin1"].kept) == 101


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="low_rank_dim"):
        SNELLAConfig(target_modules=["x"], low_rank_dim=5, heads=2)
    with pytest.raises(ValueError, match="norm_p"):
        SNELLAConfig(target_modules=["x"], norm_p=1.0)
    with pytest.raises(ValueError, match="target_sparsity"):
        SNELLAConfig(target_modules=["x"], target_sparsity=1.5)
    with pytest.raises(TypeError, match="mask_mode"):
        SNELLAConfig(target_modules=["x"], mask_mode="soft")
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        SNELLAConfig(target_modules=["x"], target_sparsity=0.8, max_layer_sparsity=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        SNELLAConfig(target_modules=["x"], total_steps=3, init_warmup=2, final_warmup=1)


# -- Triton path (issue 9): the adapter runs kernels.snella_linear with the exact top-k mask -------------------------


test_triton_tests_in_child_process = interpreter_child_test(__file__, select="triton_path")


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _kernel_adapter(base: torch.nn.Module, backend: str, **cfg) -> SNELLAAdapter:
    """A fresh adapter on `base` with non-trivial scalars (a sharp softmax, β ≠ 0) and a non-zero gate."""
    torch.manual_seed(11)
    config = SNELLAConfig(target_modules=["x"], low_rank_dim=6, heads=2, init_scale=0.9, kernel_backend=backend,
                          **cfg)
    adapter = SNELLAAdapter.create(LayerGeometry.of(base), config, base.weight, None, name="x").to(DEVICE)
    adapter.kernel_backend = config.kernel_backend  # what the bridge does after `create`
    if adapter.alpha is not None:
        with torch.no_grad():
            adapter.alpha.fill_(0.8)
            adapter.gamma.fill_(0.07)
            adapter.beta.fill_(0.004)
    return adapter


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = kernels.snella.snella_linear
    monkeypatch.setattr(kernels, "snella_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _outputs_and_grads(adapter: SNELLAAdapter, run, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of `run(adapter, x)` and the gradients of a fixed random projection of it w.r.t. x and every
    trainable (in_qs, out_qs, α, γ, β, s)."""
    y = run(adapter, x)
    params = [p for p in (adapter.in_qs, adapter.out_qs, adapter.alpha, adapter.gamma, adapter.beta, adapter.scale)
              if p is not None]
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device)
    return [y, *torch.autograd.grad((y * weights).sum(), [x, *params])]


@needs_triton
@pytest.mark.parametrize("kernel", ["snella", "snell"])
@pytest.mark.parametrize("mode", ["code", "binary"])
@pytest.mark.parametrize("route", ["fused", "delta"])
def test_triton_path_matches_torch_path(kernel: str, mode: str, route: str, monkeypatch) -> None:
    """kernel_backend="triton" runs `kernels.snella_linear` (fused W0 + Δ in forward; the delta term in
    delta_forward, the multi-adapter path) and matches the torch Function's output and every gradient to 1e-5."""
    base = torch.nn.Linear(19, 21).to(DEVICE).requires_grad_(False)  # not multiples of the 16-wide blocks
    run = (lambda a, x: a(x, FrozenBase(base))) if route == "fused" else (lambda a, x: a.delta_forward(x, None))
    x = torch.randn(2, 3, 19, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    calls = _count_kernel_calls(monkeypatch)
    results = {}
    for backend in ("torch", "triton"):
        adapter = _kernel_adapter(base, backend, kernel=kernel, mask_mode=mode, init_sparsity=0.37)
        before = len(calls)
        results[backend] = _outputs_and_grads(adapter, run, x)
        assert len(calls) - before == (1 if backend == "triton" else 0), backend
        assert int(adapter.kept) == kept_count(0.37, 19 * 21)  # the kept count is untouched by either path
    names = ["y", "x", "in_qs", "out_qs"] + (["alpha", "gamma", "beta"] if kernel == "snella" else []) + ["scale"]
    assert len(names) == len(results["triton"]) == len(results["torch"])
    for name, got, want in zip(names, results["triton"], results["torch"]):
        assert want.norm() > 0, name
        assert _rel_err(got, want) <= 1e-5, f"{name}: {_rel_err(got, want):.2e}"


@needs_triton
@pytest.mark.parametrize("mode", ["code", "binary"])
def test_triton_path_keeps_exactly_kept_entries_with_ties(mode: str, monkeypatch) -> None:
    """Duplicate input columns tie whole columns of |K|, so |K| > τ alone cannot keep exactly `kept` entries:
    the kernel's Δ (read off as s·K_effᵀ = delta_forward(I)) still has exactly `kept` non-zeros, on the same entries
    as the torch path's top-k, and equals it."""
    base = torch.nn.Linear(10, 7).to(DEVICE).requires_grad_(False)
    calls = _count_kernel_calls(monkeypatch)
    deltas = {}
    for backend in ("torch", "triton"):
        adapter = _kernel_adapter(base, backend, kernel="snell", mask_mode=mode)
        with torch.no_grad():
            adapter.in_qs[:, 5:] = adapter.in_qs[:, :5]  # columns 5-9 repeat 0-4: (H, 10, r)
        adapter.set_kept(31)  # cuts through a tie group
        scores = adapter.kernel_matrix().detach().abs()
        mask, tau, ties = topk_mask(scores, 31)
        assert ties.numel() > 0 and int((scores > tau).sum()) != 31  # a bare threshold would miss the count
        with torch.no_grad():
            deltas[backend] = adapter.delta_forward(torch.eye(10, device=DEVICE), None).T  # (in, out) -> (out, in)
        assert torch.equal(deltas[backend] != 0, mask), backend
    assert calls == [1]
    assert int((deltas["triton"] != 0).sum()) == 31
    assert _rel_err(deltas["triton"], deltas["torch"]) <= 1e-5


@needs_triton
def test_triton_path_stochastic_and_trainable_base_match_torch(monkeypatch) -> None:
    """Training with dropout and drop-path (same RNG stream), and a trainable base weight: the same unfused
    `base(x) + delta` structure on both paths, with the kernel computing the delta term."""
    base = torch.nn.Linear(19, 21).to(DEVICE)
    x = torch.randn(4, 19, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    calls = _count_kernel_calls(monkeypatch)
    for stochastic in (True, False):
        base.requires_grad_(not stochastic)
        results = {}
        for backend in ("torch", "triton"):
            adapter = _kernel_adapter(base, backend, adapter_dropout=0.3 if stochastic else 0.0,
                                      drop_path=0.4 if stochastic else 0.0, init_sparsity=0.2)
            adapter.train()
            torch.manual_seed(123)
            results[backend] = _outputs_and_grads(adapter, lambda a, x: a(x, FrozenBase(base)), x)
        for got, want in zip(results["triton"], results["torch"]):
            assert _rel_err(got, want) <= 1e-5
    assert len(calls) == 2


@needs_triton
def test_triton_path_model_flag_and_torch_flag(monkeypatch) -> None:
    """The config flag reaches every layer through the bridge: "triton" calls the kernel per adapted layer with the
    torch path's outputs, "torch" never calls it; conv layers would stay on the torch Function (not fusable)."""
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    outputs = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = specpeft.get_adapter_model(MLP(), SNELLAConfig(target_modules=["lin0", "lin1"], low_rank_dim=4,
                                                               init_scale=0.7, kernel_backend=backend)).to(DEVICE)
        before = len(calls)
        outputs[backend] = model(x)
        assert len(calls) - before == (2 if backend == "triton" else 0), backend
    assert _rel_err(outputs["triton"], outputs["torch"]) <= 1e-5
    conv = torch.nn.Conv2d(3, 4, 3).to(DEVICE).requires_grad_(False)
    adapter = _kernel_adapter(conv, "triton")
    before = len(calls)
    adapter(torch.randn(1, 3, 5, 5, device=DEVICE), FrozenBase(conv))
    assert len(calls) == before
