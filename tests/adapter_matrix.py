"""The foundation parameter matrix: tiny models × lifecycle checks, shared by every method's tests.

A method's test file declares a `MethodCase` and parametrizes `run_check` over `MODEL_CASES × CHECKS`. Every
check compares against an independent reference: the frozen base model, or a copy of it whose weights were
replaced by `W + delta_weight` and run through the stock modules.
"""

from __future__ import annotations

import copy
import io
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import specpeft
from specpeft._peft_compat import BaseTunerLayer, PeftModel
from specpeft.adapters.base import MethodAdapter
from specpeft.adapters.bridge import AdapterLayer

SEED = 1234


# -- models -----------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(24, 40)
        self.lin1 = nn.Linear(40, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(F.gelu(self.lin0(x)))


class SamePadConv2d(nn.Conv2d):
    """EfficientNet's Conv2dStaticSamePadding pattern: a Conv2d subclass that pads in its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConvNet(nn.Module):
    """Conv2d stem, a strided/padded conv, a grouped conv, a dilated conv, 1×1 conv, a same-pad conv, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=4)
        self.dilated = nn.Conv2d(12, 8, 3, padding=2, dilation=2)
        self.point = nn.Conv2d(8, 8, 1)
        self.same = SamePadConv2d(8, 8, 2, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.down, self.grouped, self.dilated, self.point, self.same):
            x = F.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


class QuantizedMLP(nn.Module):
    """A bitsandbytes 4-bit Linear base (nf4, fp32 compute) followed by a plain head."""

    def __init__(self) -> None:
        super().__init__()
        import bitsandbytes as bnb

        # 64×64: bitsandbytes' CPU inference layout (AVX512-bf16 machines) needs d_out % 32 == 0 and d_in % 64 == 0
        dense = nn.Linear(64, 64)
        self.q4 = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        self.q4.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        self.q4.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        self.q4 = self.q4.to("cpu")  # quantizes
        self.head = nn.Linear(64, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.q4(x))


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=96, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=False)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    return GPT2LMHeadModel(cfg)


def _ids(batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED + 1)
    return {"input_ids": torch.randint(0, 96, (batch, length), generator=gen)}


@dataclass
class ModelCase:
    """A tiny model, its inputs, the modules to target and how to read its output."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    targets: list[str] | str
    kinds: set[str] = field(default_factory=lambda: {"linear"})
    quantized: bool = False

    def model(self) -> nn.Module:
        torch.manual_seed(SEED)
        return self.build().eval()

    def run(self, model: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        inputs = self.inputs()
        if dtype is not None:
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out = model(**inputs)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _tensor_input(*shape: int) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"x": torch.randn(*shape, generator=torch.Generator().manual_seed(SEED + 2))}


MODEL_CASES: dict[str, ModelCase] = {
    "mlp": ModelCase(MLP, _tensor_input(5, 24), ["lin0", "lin1"]),
    "llama": ModelCase(_tiny_llama, _ids, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "bert": ModelCase(_tiny_bert, _ids, ["query", "value", "dense"]),
    "gpt2": ModelCase(_tiny_gpt2, _ids, ["c_attn", "c_proj", "c_fc"]),
    "convnet": ModelCase(ConvNet, _tensor_input(2, 3, 10, 10), ["stem", "down", "grouped", "dilated", "point", "same"],
                         kinds={"conv2d"}),
    "bnb4": ModelCase(QuantizedMLP, _tensor_input(5, 64), ["q4"], quantized=True),
}


# -- the method side --------------------------------------------------------------------------------------------


@dataclass
class MethodCase:
    """How a method enters the matrix.

    Attributes:
        make_config: target_modules -> a fresh config of the method.
        trainable: names of the trainable tensors inside one adapter module (e.g. {"s"} for SVFit).
        perturb_scale: std of the Gaussian noise added to every trainable before the post-training checks.
        bf16_atol: allowed |output - base output| at init with a bf16 base (0.0 = exact).
        init_atol: allowed |output - base output| at init in fp32 (0.0 = exact).
        unsupported_models: model cases whose layers the method does not adapt; every check then asserts that
            wrapping fails with a clear TypeError naming the layer instead of training wrong.
    """

    make_config: Callable[[Any], Any]
    trainable: set[str]
    perturb_scale: float = 0.1
    bf16_atol: float = 0.0
    init_atol: float = 0.0
    unsupported_models: set[str] = field(default_factory=set)


def adapted(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def perturb(model: nn.Module, scale: float, seed: int = SEED + 3) -> None:
    """Add seeded Gaussian noise to every trainable tensor (simulates training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p))


def reference_with_deltas(case: ModelCase, peft_model: nn.Module) -> nn.Module:
    """A fresh base whose adapted weights are W + delta_weight, run by the stock modules (the oracle).

    For a quantized base the stock module is replaced by an fp32 nn.Linear on the dequantized weight.
    """
    ref = case.model()
    for name, layer in adapted(peft_model):
        key = name.removeprefix("base_model.model.")
        parent_name, _, child_name = key.rpartition(".")
        parent = ref.get_submodule(parent_name) if parent_name else ref
        child = getattr(parent, child_name)
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.adapters)
        with torch.no_grad():
            if case.quantized:
                dense = nn.Linear(layer.in_features, layer.out_features)
                dense.weight.copy_(layer.get_base_weight().float() + delta)
                dense.bias.copy_(child.bias)
                setattr(parent, child_name, dense)
            else:
                child.weight.add_(delta.to(child.weight.dtype))
    return ref


def wrap(case: ModelCase, method: MethodCase, adapter_name: str = "default") -> PeftModel:
    return specpeft.get_adapter_model(case.model(), method.make_config(case.targets), adapter_name=adapter_name)


# -- checks -----------------------------------------------------------------------------------------------------


def check_init_invariance(case: ModelCase, method: MethodCase) -> None:
    base_out = case.run(case.model())
    out = case.run(wrap(case, method))
    torch.testing.assert_close(out, base_out, atol=method.init_atol, rtol=0)


def check_bf16_init(case: ModelCase, method: MethodCase) -> None:
    base = case.model().to(torch.bfloat16)
    model = specpeft.get_adapter_model(case.model().to(torch.bfloat16), method.make_config(case.targets))
    out, ref = case.run(model, torch.bfloat16), case.run(base, torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), atol=method.bf16_atol, rtol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad), "trainables must stay fp32"


def check_forward_equals_delta(case: ModelCase, method: MethodCase) -> None:
    model = wrap(case, method)
    perturb(model, method.perturb_scale)
    out = case.run(model)
    assert not torch.allclose(out, case.run(case.model())), "perturbation did not change the output"
    tol = 2e-2 if case.quantized else 1e-4
    torch.testing.assert_close(out, case.run(reference_with_deltas(case, model)), atol=tol, rtol=tol)


def check_save_load(case: ModelCase, method: MethodCase) -> None:
    model = wrap(case, method)
    perturb(model, method.perturb_scale)
    out = case.run(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = specpeft.load_adapter_model(case.model(), tmp)
        torch.testing.assert_close(case.run(reloaded), out, atol=0, rtol=0)
        stock = PeftModel.from_pretrained(case.model(), tmp)  # after `import specpeft`
        torch.testing.assert_close(case.run(stock), out, atol=0, rtol=0)


def check_disable(case: ModelCase, method: MethodCase) -> None:
    model = wrap(case, method)
    perturb(model, method.perturb_scale)
    with model.disable_adapter():
        torch.testing.assert_close(case.run(model), case.run(case.model()), atol=0, rtol=0)


def check_merge_and_unload(case: ModelCase, method: MethodCase) -> None:
    model = wrap(case, method)
    perturb(model, method.perturb_scale)
    out = case.run(model)
    reference = reference_with_deltas(case, model)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert [type(m) for m in merged.modules()] == [type(m) for m in case.model().modules()]
    if not case.quantized:
        torch.testing.assert_close(case.run(merged), out, atol=1e-4, rtol=1e-4)
        return
    # A 4-bit base stays 4-bit (peft's behaviour): W + ΔW is re-quantized, so compare weights against the nf4
    # bound instead of outputs: half the widest nf4 level gap (0.304 / 2) times the largest |weight|.
    from peft.utils.integrations import dequantize_bnb_weight

    for name, module in merged.named_modules():
        if hasattr(getattr(module, "weight", None), "quant_state"):
            expected = reference.get_submodule(name).weight
            got = dequantize_bnb_weight(module.weight, state=module.weight.quant_state)
            assert (got - expected).abs().max() <= 0.16 * expected.abs().max()


def check_two_adapters(case: ModelCase, method: MethodCase) -> None:
    model = wrap(case, method)
    perturb(model, method.perturb_scale)
    first = case.run(model)
    model.add_adapter("other", method.make_config(case.targets))
    model.set_adapter("other")
    torch.testing.assert_close(case.run(model), case.run(case.model()), atol=method.init_atol, rtol=0)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".other." in n for n in grads), sorted(grads)[:5]
    model.set_adapter("default")
    torch.testing.assert_close(case.run(model), first, atol=0, rtol=0)
    model.delete_adapter("other")
    assert not any(".other." in n for n, _ in model.named_parameters())


def check_requires_grad(case: ModelCase, method: MethodCase) -> None:
    model = wrap(case, method)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names, "nothing is trainable"
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        assert ".default." in name and leaf in method.trainable, f"unexpected trainable tensor {name}"
    loss = case.run(model).float().pow(2).mean()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def check_copy_and_cast(case: ModelCase, method: MethodCase) -> None:
    """A trained adapted model deep-copies and pickles (`torch.save` of the whole model) to the same outputs, and a
    16-bit cast of the model leaves every adapter's ΔW bit for bit (its fp32 tensors are moved, not narrowed)."""
    model = wrap(case, method)
    perturb(model, method.perturb_scale)
    out = case.run(model)
    torch.testing.assert_close(case.run(copy.deepcopy(model)), out, atol=0, rtol=0)
    if case.quantized:  # bitsandbytes' own parameters neither pickle nor cast; the copy above is what trainers do
        return
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(case.run(torch.load(buffer, weights_only=False)), out, atol=0, rtol=0)
    adapters = [m for m in model.modules() if isinstance(m, MethodAdapter)]
    deltas = [adapter.delta_weight().detach() for adapter in adapters]
    model.to(torch.bfloat16)
    for adapter, delta in zip(adapters, deltas):
        assert all(t.dtype != torch.bfloat16 for t in [*adapter.parameters(), *adapter.buffers()])
        torch.testing.assert_close(adapter.delta_weight().detach(), delta, atol=0, rtol=0)
    model.to("meta").half()  # a dtype-only cast leaves every tensor on its device (meta standing in for a GPU)
    for adapter in adapters:
        assert all(t.is_meta and t.dtype != torch.float16 for t in [*adapter.parameters(), *adapter.buffers()])


CHECKS: dict[str, Callable[[ModelCase, MethodCase], None]] = {
    "init_invariance": check_init_invariance,
    "bf16_init": check_bf16_init,
    "forward_equals_delta": check_forward_equals_delta,
    "save_load": check_save_load,
    "disable": check_disable,
    "merge_and_unload": check_merge_and_unload,
    "two_adapters": check_two_adapters,
    "requires_grad": check_requires_grad,
    "copy_and_cast": check_copy_and_cast,
}


def run_check(check: str, method: MethodCase, model_name: str) -> None:
    """Run one matrix cell; an unsupported model is asserted to fail cleanly instead."""
    case = MODEL_CASES[model_name]
    if model_name in method.unsupported_models:
        import pytest

        with pytest.raises(TypeError, match="does not support"):
            wrap(case, method)
        return
    if check == "bf16_init" and case.quantized:
        return  # the 4-bit base computes in its own compute dtype; covered by the fp32 checks
    CHECKS[check](case, method)
