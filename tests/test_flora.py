"""FLoRA: spec formula (§3.1) against float64 references, factored paths, grouped convs, and the parameter matrix."""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import specpeft
from adapter_matrix import CHECKS, MODEL_CASES, MethodCase, ModelCase, SamePadConv2d, perturb, run_check
from specpeft import FLoRAConfig, FrozenBase, LayerGeometry
from specpeft.adapters.flora import FLoRAAdapter, trainable_count

TRAINABLE = {"core"} | {f"factor_{i}" for i in range(5)}
CASE = MethodCase(make_config=lambda targets: FLoRAConfig(target_modules=targets, r=4, scale=2.0), trainable=TRAINABLE)
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# -- extra models: a ResNet-style ConvNet, Conv1d and Conv3d nets -------------------------------------------------


class ResNetBlockNet(nn.Module):
    """Stem, a ResNet basic block with a strided 1×1 shortcut, a depthwise-separable pair, a same-pad conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16)
        self.pointwise = nn.Conv2d(16, 12, 1)
        self.same = SamePadConv2d(12, 12, 2, stride=2)
        self.reflect = nn.Conv2d(12, 8, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(8, 4)
        with torch.no_grad():  # non-trivial BN statistics, as in a pretrained net
            for bn in (self.bn0, self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        x = F.relu(self.pointwise(F.relu(self.depthwise(x))))
        x = F.relu(self.reflect(F.relu(self.same(x))))
        return self.head(x.mean(dim=(2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(4, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 8, 5, stride=2, padding=4, dilation=2, groups=2)
        self.c = nn.Conv1d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b(F.relu(self.a(x))))
        return self.head(F.relu(self.c(x)).mean(dim=2))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, 6, 3, padding=1)
        self.b = nn.Conv3d(6, 6, (3, 1, 3), stride=(2, 1, 2), padding=(1, 0, 1), groups=6)
        self.c = nn.Conv3d(6, 4, 2, dilation=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        return self.head(x.mean(dim=(2, 3, 4)))


def _input(*shape: int):
    return lambda: {"x": torch.randn(*shape, generator=torch.Generator().manual_seed(7))}


EXTRA_CASES: dict[str, ModelCase] = {
    "resnet_block": ModelCase(ResNetBlockNet, _input(2, 3, 12, 12),
                              ["stem", "conv1", "conv2", "shortcut", "depthwise", "pointwise", "same", "reflect"],
                              kinds={"conv2d"}),
    "conv1d": ModelCase(Conv1dNet, _input(2, 4, 17), ["a", "b", "c"], kinds={"conv1d"}),
    "conv3d": ModelCase(Conv3dNet, _input(2, 2, 7, 6, 7), ["a", "b", "c"], kinds={"conv3d"}),
}


# -- the foundation matrix ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODEL_CASES))
@pytest.mark.parametrize("check", list(CHECKS))
def test_matrix(check: str, model_name: str) -> None:
    run_check(check, CASE, model_name)


@pytest.mark.parametrize("model_name", list(EXTRA_CASES))
@pytest.mark.parametrize("check", list(CHECKS))
def test_matrix_conv_models(check: str, model_name: str) -> None:
    CHECKS[check](EXTRA_CASES[model_name], CASE)


@pytest.mark.parametrize("mode", ["factored", "materialized"])
@pytest.mark.parametrize("model_name", ["convnet", "resnet_block", "conv1d", "conv3d"])
@pytest.mark.parametrize("check", ["forward_equals_delta", "merge_and_unload"])
def test_forward_modes_through_bridge(check: str, model_name: str, mode: str) -> None:
    """Merge == forward == stock modules on W + ΔW, for every conv dimensionality and both forward paths."""
    case = MODEL_CASES.get(model_name) or EXTRA_CASES[model_name]
    method = MethodCase(lambda t: FLoRAConfig(target_modules=t, r=3, forward_mode=mode),
                        trainable=TRAINABLE)
    CHECKS[check](case, method)


@pytest.mark.parametrize("model_name", ["mlp", "resnet_block", "conv1d", "conv3d"])
def test_merge_unmerge_round_trip(model_name: str) -> None:
    """merge_adapter: output unchanged with W ← W + ΔW; unmerge_adapter: W restored (fp32 rounding only)."""
    case = MODEL_CASES.get(model_name) or EXTRA_CASES[model_name]
    model = specpeft.get_adapter_model(case.model(), CASE.make_config(case.targets))
    perturb(model, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    out = case.run(model)
    model.merge_adapter()
    torch.testing.assert_close(case.run(model), out, atol=1e-5, rtol=1e-5)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "merging changed no base weight"
    model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(case.run(model), out, atol=1e-5, rtol=1e-5)


# -- the spec formula -----------------------------------------------------------------------------------------------


def _spec_delta(adapter: FLoRAAdapter) -> torch.Tensor:
    """Float64 ΔW[o, i, κ…] = s Σ G[a, b, c…] P0[i, a] P1[o, b] Π P_{2+j}[κ_j, c_j] (spec §3.1 einsum form)."""
    n = adapter.n_modes
    ranks, modes = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    operands = [adapter.core.double()] + [f.double() for f in adapter.factors]
    equation = ",".join([ranks] + [modes[i] + ranks[i] for i in range(n)]) + "->" + modes[1] + modes[0] + modes[2:]
    return adapter.scale * torch.einsum(equation, *operands)


def _official_delta(adapter: FLoRAAdapter) -> torch.Tensor:
    """The official code's tensordot chain (flora/layers.py FLoRALayer.forward), then transpose(0, 1), float64."""
    factors = [f.double() for f in adapter.factors]
    delta = torch.tensordot(adapter.core.double(), factors[0], dims=[[0], [1]])
    for factor in factors[1:]:
        delta = torch.tensordot(delta, factor, dims=[[0], [1]])
    return adapter.scale * delta.transpose(0, 1)


def _random_adapter(base: nn.Module, ranks, scale: float = 1.7, seed: int = 0, **cfg) -> FLoRAAdapter:
    torch.manual_seed(seed)
    config = FLoRAConfig(target_modules=["x"], r=ranks, scale=scale, **cfg)
    adapter = FLoRAAdapter.create(LayerGeometry.of(base), config, base.weight.detach(), None, name="x")
    with torch.no_grad():
        adapter.core.normal_()  # a trained-looking core (zero at init)
    return adapter


@pytest.mark.parametrize(
    "base,ranks",
    [
        (nn.Linear(7, 5), [3, 2]),
        (nn.Conv1d(4, 6, 3), [2, 3, 2]),
        (nn.Conv2d(5, 6, (3, 2)), [3, 4, 2, 1]),
        (nn.Conv3d(3, 4, (2, 3, 2)), [2, 3, 2, 2, 1]),
    ],
    ids=["linear", "conv1d", "conv2d", "conv3d"],
)
def test_delta_weight_is_spec_formula(base: nn.Module, ranks: list[int]) -> None:
    adapter = _random_adapter(base, ranks)
    assert tuple(adapter.delta_weight().shape) == tuple(base.weight.shape)
    torch.testing.assert_close(adapter.delta_weight().double(), _spec_delta(adapter), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_official_delta(adapter), _spec_delta(adapter), atol=1e-12, rtol=0)


def test_linear_orientation_and_thin_matmuls() -> None:
    """d_in ≠ d_out and r₀ ≠ r₁: x ΔWᵀ = s ((x P₀) G) P₁ᵀ, and ΔW = s P₁ Gᵀ P₀ᵀ (spec §3.1)."""
    base = nn.Linear(11, 6)
    adapter = _random_adapter(base, [4, 2]).double()
    p_in, p_out = adapter.factors
    assert p_in.shape == (11, 4) and p_out.shape == (6, 2) and adapter.core.shape == (4, 2)
    torch.testing.assert_close(adapter.delta_weight(), adapter.scale * p_out @ adapter.core.T @ p_in.T)
    x = torch.randn(3, 5, 11, dtype=torch.float64)
    torch.testing.assert_close(adapter.factored_delta(x), F.linear(x, _spec_delta(adapter)), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "dims,geometry",
    [(d, g) for d in (1, 2, 3) for g in ("stride2_pad1", "dilation2_pad2")] + [(2, "same"), (2, "stride2_valid")],
)
@pytest.mark.parametrize("groups", ["one", "four", "depthwise"])
def test_factored_conv_equals_dense_conv(dims: int, geometry: str, groups: str) -> None:
    """1×1 → core conv → 1×1 (grouped like the base) equals conv(x, ΔW) with the base settings, float64."""
    channels = 8
    g = {"one": 1, "four": 4, "depthwise": channels}[groups]
    kwargs = {
        "stride2_pad1": dict(stride=2, padding=1),
        "dilation2_pad2": dict(dilation=2, padding=2),
        "same": dict(padding="same"),
        "stride2_valid": dict(stride=2, padding="valid"),
    }[geometry]
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    base = conv_cls(channels, 16, 3, groups=g, bias=False, **kwargs).double()
    adapter = _random_adapter(base, [3, 5] + [2] * dims).double()
    x = torch.randn(2, channels, *(9,) * dims, dtype=torch.float64)
    expected = CONV_FN[dims](x, _spec_delta(adapter), None, base.stride, base.padding, base.dilation, g)
    torch.testing.assert_close(adapter.factored_delta(x), expected, atol=1e-10, rtol=0)
    out = adapter(x, FrozenBase(base))  # the whole layer, whichever path `auto` takes
    torch.testing.assert_close(out, base(x) + expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["factored", "materialized"])
@pytest.mark.parametrize("dims", [2, 3])
def test_conv_step_under_bf16_autocast(dims: int, mode: str) -> None:
    """Under CPU bf16 autocast (Trainer(bf16=True)) the core's kernel-mode contractions stay in fp32: the layer runs,
    within bf16 rounding of the fp32 output, and the core gets its gradient."""
    conv_cls = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    base = conv_cls(4, 6, 3, padding=1)
    adapter = _random_adapter(base, [3, 2] + [2] * dims, forward_mode=mode)
    x = torch.randn(2, 4, *(5,) * dims)
    expected = adapter(x, FrozenBase(base))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(x, FrozenBase(base))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2 * expected.abs().max().item(), rtol=0)
    (grad,) = torch.autograd.grad(out.float().sum(), [adapter.core])
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_depthwise_conv_shapes_and_clamped_ranks() -> None:
    """Spec §3.9 check 5: Conv2d(C, C, 7, groups=C) → ΔW (C, 1, 7, 7); ranks clamp to mode sizes."""
    base = nn.Conv2d(16, 16, 7, padding=3, groups=16)
    adapter = _random_adapter(base, 16)
    assert adapter.ranks == [1, 16, 7, 7]
    assert adapter.delta_weight().shape == (16, 1, 7, 7)
    stem = _random_adapter(nn.Conv2d(3, 32, 3), [16, 16, 2, 2])
    assert stem.ranks == [3, 16, 2, 2]
    assert sum(p.numel() for p in stem.parameters()) == trainable_count([3, 32, 3, 3], [3, 16, 2, 2])


def test_parameter_counts_match_spec() -> None:
    """Spec §3.7: 4096² Linear at r=8 → 65,600; 256→256 3×3 conv at r=[16,16,2,2] → 9,228."""
    assert trainable_count([4096, 4096], [8, 8]) == 65_600
    adapter = FLoRAAdapter.create(LayerGeometry("conv2d", (256, 256, 3, 3), stride=(1, 1), padding=(1, 1),
                                                dilation=(1, 1)), FLoRAConfig(target_modules=["x"], r=[16, 16, 2, 2]),
                                  None, None)
    assert sum(p.numel() for p in adapter.parameters()) == 9_228


# -- init, gradients, dropout -------------------------------------------------------------------------------------


def test_init_is_exact_and_only_core_gets_gradient() -> None:
    """Spec §3.9 check 4, and the Kaiming(a=√3) factor scale N(0, 1/(2 r_i)) of §3.2."""
    torch.manual_seed(0)
    base = nn.Conv2d(64, 96, 3, padding=1)
    adapter = FLoRAAdapter.create(LayerGeometry.of(base), FLoRAConfig(target_modules=["x"], r=[32, 48, 3, 3]),
                                  base.weight.detach(), None)
    assert torch.count_nonzero(adapter.core) == 0
    for factor, rank in zip(adapter.factors[:2], [32, 48]):
        assert abs(factor.std().item() * math.sqrt(2 * rank) - 1.0) < 0.05
    x = torch.randn(2, 64, 6, 6)
    out = adapter(x, FrozenBase(base))
    assert torch.equal(out, base(x))
    out.pow(2).sum().backward()
    assert adapter.core.grad.abs().sum() > 0
    assert all(f.grad is None or torch.count_nonzero(f.grad) == 0 for f in adapter.factors)


@pytest.mark.parametrize("mode", ["factored", "materialized"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dropout_reaches_only_the_adapter_input(kind: str, mode: str) -> None:
    """Train mode: base(x) + op(dropout(x), ΔW) (one mask draw); eval mode: op(x, W + ΔW)."""
    torch.manual_seed(0)
    base = nn.Linear(10, 7) if kind == "linear" else nn.Conv2d(10, 7, 3, stride=2, padding=1)
    adapter = _random_adapter(base, [3, 4] if kind == "linear" else [3, 4, 2, 2], dropout=0.5, forward_mode=mode)
    x = torch.randn(6, 10) if kind == "linear" else torch.randn(2, 10, 7, 7)
    geometry = LayerGeometry.of(base)
    torch.manual_seed(11)
    out = adapter(x, FrozenBase(base))
    torch.manual_seed(11)
    expected = base(x) + geometry.apply(F.dropout(x, 0.5, training=True), adapter.delta_weight())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    adapter.eval()
    merged = geometry.apply(x, base.weight + adapter.delta_weight(), base.bias)
    torch.testing.assert_close(adapter(x, FrozenBase(base)), merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_dropout_with_custom_padding_conv(mode: str) -> None:
    """A conv with its own forward (same padding) always materializes; with dropout the delta runs that forward."""
    base = SamePadConv2d(6, 5, 2, stride=2)
    adapter = _random_adapter(base, 3, dropout=0.3, forward_mode=mode)
    assert not adapter.use_factored(torch.randn(1, 6, 8, 8))
    x = torch.randn(2, 6, 9, 9)
    torch.manual_seed(5)
    out = adapter(x, FrozenBase(base))
    torch.manual_seed(5)
    dropped = F.pad(F.dropout(x, 0.3, training=True), (0, 1, 0, 1))
    expected = base(x) + F.conv2d(dropped, adapter.delta_weight(), None, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- path choice, records, options --------------------------------------------------------------------------------


def test_auto_path_follows_mac_counts() -> None:
    """256→256 3×3 on 32×32 maps at r=8: training factors (a weight-grad conv costs more than three thin stages);
    inference on the same batch materializes (building ΔW once is cheaper than the stages over 8,192 positions)."""
    base = nn.Conv2d(256, 256, 3, padding=1, device="meta")
    config = FLoRAConfig(target_modules=["x"], r=8)
    adapter = FLoRAAdapter.create(LayerGeometry.of(base), config, None, None)
    batch = torch.empty(8, 256, 32, 32, device="meta")
    factored, materialized = adapter.costs(batch)
    stages = 8 * 1024 * (256 * 8 + 8 * 8 * 9 + 8 * 256)
    assert factored == 3 * stages and adapter.use_factored(batch)
    with torch.no_grad():
        assert not adapter.use_factored(batch)


def test_record_rebuilds_without_weight() -> None:
    base = nn.Conv2d(6, 10, 3)
    adapter = _random_adapter(base, [4, 20, 5, 1])
    assert adapter.record() == {"ranks": [4, 10, 3, 1]}
    other_config = FLoRAConfig(target_modules=["x"], r=2)  # the record wins over the config's rank
    rebuilt = FLoRAAdapter.create(LayerGeometry.of(base), other_config, None, adapter.record())
    assert [tuple(p.shape) for p in rebuilt.parameters()] == [tuple(p.shape) for p in adapter.parameters()]
    assert all(torch.count_nonzero(p) == 0 for p in rebuilt.parameters())


def test_rank_pattern_wins_and_bad_options_name_the_field() -> None:
    config = FLoRAConfig(target_modules=["x"], r=4, rank_pattern={"conv": [2, 3, 1, 1], "blocks\\.\\d+\\.fc": 6})
    assert config.rank_spec_for("model.conv") == [2, 3, 1, 1]
    assert config.rank_spec_for("blocks.3.fc") == 6
    assert config.rank_spec_for("head") == 4
    with pytest.raises(ValueError, match="FLoRAConfig.r"):
        FLoRAConfig(target_modules=["x"], r=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        FLoRAConfig(target_modules=["x"], rank_pattern={"a": [1, 0]})
    with pytest.raises(ValueError, match="dropout"):
        FLoRAConfig(target_modules=["x"], dropout=1.0)
    with pytest.raises(TypeError, match="forward_mode"):
        FLoRAConfig(target_modules=["x"], forward_mode="fast")
    with pytest.raises(ValueError, match="4 modes"):
        _random_adapter(nn.Conv2d(3, 4, 3), [2, 2])
