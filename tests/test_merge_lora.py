"""`specpeft to-lora`: the output is a stock peft LoRA that reproduces the adapter (exactly at full rank) and whose
per-layer error is the one reported (and the Eckart–Young optimum of the truncation).

References: the live adapter model's outputs and float64 ΔW; peft's own LoRA layers loading the converted files.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import specpeft
from adapter_matrix import ConvNet, _tiny_gpt2, _tiny_llama
from specpeft.merge import merge_adapter
from specpeft.merge.lora import REPORT_NAME, convert_to_lora
from test_merge import PERTURB, _auto, ids, logits, method_config, save_tiny, train_and_save

TARGETS = ["q_proj", "down_proj"]  # 32×32 and 32×48: every ΔW has rank ≤ 32


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(_tiny_llama, str(tmp_path_factory.mktemp("llama")))


def live_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name → float64 ΔW (normalized layout) of every adapted layer of a peft model."""
    found = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "get_delta_weight") and hasattr(layer, "base_layer"):
            with torch.no_grad():
                delta = layer.get_delta_weight(layer.active_adapters[0]).double()
            found[name.removeprefix("base_model.model.")] = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    return found


def stock_lora(base: nn.Module, path: str) -> nn.Module:
    from peft import PeftConfig, PeftModel

    assert PeftConfig.from_pretrained(path).peft_type == "LORA"
    return PeftModel.from_pretrained(base, path).eval()


@pytest.fixture(scope="module")
def trained(llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, torch.Tensor, dict]]:
    """method → (saved adapter dir, the adapter model's logits on `ids()`, its float64 ΔW per layer); lazily."""

    class Lazy(dict):
        def __missing__(self, method: str) -> tuple[str, torch.Tensor, dict]:
            path = str(tmp_path_factory.mktemp(method))
            model = train_and_save(_auto(llama_dir), method_config(method, TARGETS), path, PERTURB.get(method, 0.1))
            self[method] = (path, logits(model, ids()), live_deltas(model))
            return self[method]

    return Lazy()


@pytest.mark.parametrize("method", specpeft.list_methods())
def test_every_method_converts(method: str, llama_dir: str, trained: dict, tmp_path) -> None:
    adapter, expected, deltas = trained[method]
    x = ids()
    # full rank: exact for every method
    full = convert_to_lora(adapter, tmp_path / "full", rank=32, progress=False)
    assert full.max_relative_error < 1e-5
    lora = stock_lora(_auto(llama_dir), str(tmp_path / "full"))
    torch.testing.assert_close(logits(lora, x), expected, atol=1e-4, rtol=1e-4)
    # rank 2: the reported error is the true one and the Eckart–Young optimum sqrt(Σ_{i>2} σ_i² / Σ σ_i²)
    low = convert_to_lora(adapter, tmp_path / "low", rank=2, progress=False)
    converted = live_deltas(stock_lora(_auto(llama_dir), str(tmp_path / "low")))
    for layer in low.layers:
        delta = deltas[layer.name]
        sigma = torch.linalg.svdvals(delta)
        optimum = float((sigma[2:].pow(2).sum() / sigma.pow(2).sum()).sqrt())
        measured = float((converted[layer.name] - delta).norm() / delta.norm())
        assert layer.rank == 2
        assert layer.relative_error == pytest.approx(measured, rel=1e-4, abs=1e-6)
        assert layer.relative_error == pytest.approx(optimum, rel=1e-3, abs=1e-6)
    with open(tmp_path / "low" / REPORT_NAME) as fh:
        assert json.load(fh)["max_relative_error"] == pytest.approx(low.max_relative_error)
    if method in ("svfit", "fedsvd"):  # rank(ΔW) ≤ 4: exact at the method's own rank
        exact = convert_to_lora(adapter, tmp_path / "r4", rank=4, progress=False)
        assert exact.max_relative_error < 1e-5
        torch.testing.assert_close(logits(stock_lora(_auto(llama_dir), str(tmp_path / "r4")), x), expected,
                                   atol=1e-4, rtol=1e-4)


def test_energy_mode_gives_per_layer_ranks(llama_dir: str, tmp_path) -> None:
    model = train_and_save(_auto(llama_dir), method_config("tera", ["q_proj", "v_proj", "down_proj"]),
                           str(tmp_path / "adapter"))
    deltas = live_deltas(model)
    report = convert_to_lora(tmp_path / "adapter", tmp_path / "lora", energy=0.9, progress=False)
    ranks = {layer.name: layer.rank for layer in report.layers}
    for name, delta in deltas.items():
        sigma2 = torch.linalg.svdvals(delta).pow(2)
        share = sigma2.cumsum(0) / sigma2.sum()
        assert ranks[name] == int((share < 0.9 - 1e-12).sum()) + 1  # the smallest r with Σ_{i≤r} σ_i² ≥ 0.9 Σσ²
    assert len(set(ranks.values())) > 1, "the test needs layers of different ranks"
    with open(tmp_path / "lora" / "adapter_config.json") as fh:
        config = json.load(fh)
    common = config["r"]
    assert config["rank_pattern"] == {n: r for n, r in ranks.items() if r != common} == config["alpha_pattern"]
    lora = stock_lora(_auto(llama_dir), str(tmp_path / "lora"))
    for name, layer in lora.named_modules():
        key = name.removeprefix("base_model.model.")
        if key in ranks:
            assert layer.lora_A["default"].weight.shape[0] == ranks[key] and layer.scaling["default"] == 1.0


def test_gpt2_conv1d_layout(tmp_path) -> None:
    base_dir = save_tiny(_tiny_gpt2, str(tmp_path / "base"))
    model = train_and_save(_auto(base_dir), method_config("svfit", ["c_attn", "c_fc"]), str(tmp_path / "adapter"))
    convert_to_lora(tmp_path / "adapter", tmp_path / "lora", rank=4, base=base_dir, progress=False)
    with open(tmp_path / "lora" / "adapter_config.json") as fh:
        assert json.load(fh)["fan_in_fan_out"] is True
    x = ids()
    torch.testing.assert_close(logits(stock_lora(_auto(base_dir), str(tmp_path / "lora")), x), logits(model, x),
                               atol=1e-4, rtol=1e-4)


def test_convs_grouped_exact_dilated_refused(tmp_path) -> None:
    torch.manual_seed(0)
    base = ConvNet().eval()
    os.makedirs(tmp_path / "base")
    save_file(base.state_dict(), str(tmp_path / "base" / "model.safetensors"))
    targets = ["stem", "down", "grouped", "point"]
    model = train_and_save(copy.deepcopy(base), method_config("flora", targets), str(tmp_path / "adapter"))
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    report = convert_to_lora(tmp_path / "adapter", tmp_path / "lora", rank=108, progress=False)
    assert {layer.name: layer.rank for layer in report.layers}["grouped"] == 12  # 4 groups × min(3, 27)
    assert report.max_relative_error < 1e-5
    with pytest.warns(UserWarning, match="groups > 1"), torch.no_grad():
        lora = stock_lora(copy.deepcopy(base), str(tmp_path / "lora"))
        torch.testing.assert_close(lora(x), model(x), atol=1e-4, rtol=1e-4)
        # the grouped LoRA is block-diagonal, so it merges back into the grouped weight exactly
        merge_adapter(tmp_path / "base", tmp_path / "lora", tmp_path / "merged", progress=False)
        from safetensors.torch import load_file

        merged = ConvNet().eval()
        merged.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")))
        torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)
    train_and_save(copy.deepcopy(base), method_config("svfit", ["dilated"]), str(tmp_path / "dilated"))
    with pytest.raises(ValueError, match="'dilated' is a dilated conv"):
        convert_to_lora(tmp_path / "dilated", tmp_path / "refused", rank=4, progress=False)
    assert not os.path.exists(tmp_path / "refused")


def test_lora_and_dora_sources(llama_dir: str, tmp_path) -> None:
    """A peft LoRA (with an embedding) re-ranks exactly; DoRA needs the base and converts exactly at full rank."""
    from peft import LoraConfig, get_peft_model

    x = ids()
    for name, config, rank in (
        ("lora", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "embed_tokens"]), 4),
        ("dora", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]), 32),
    ):
        model = get_peft_model(_auto(llama_dir), config).eval()
        from adapter_matrix import perturb

        perturb(model, 0.2)
        model.save_pretrained(str(tmp_path / name))
        if name == "dora":
            with pytest.raises(ValueError, match="DoRA.*--base"):
                convert_to_lora(tmp_path / name, tmp_path / f"{name}_out", rank=rank, progress=False)
        report = convert_to_lora(tmp_path / name, tmp_path / f"{name}_out", rank=rank, base=llama_dir,
                                 progress=False)
        assert report.max_relative_error < 1e-5
        lora = stock_lora(_auto(llama_dir), str(tmp_path / f"{name}_out"))
        torch.testing.assert_close(logits(lora, x), logits(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_of_adapted_layers_survive(bias: str, tmp_path) -> None:
    """A LoRA trained with bias="all"/"lora_only" (FedSVD's LoRA too) saves the adapted layers' biases; the converted
    LoRA must put them where peft's LoRA layer reads them (its base_layer), or they are silently dropped."""
    from peft import LoraConfig, get_peft_model

    from adapter_matrix import perturb

    base_dir = save_tiny(_tiny_gpt2, str(tmp_path / "base"))
    model = get_peft_model(_auto(base_dir), LoraConfig(r=4, lora_alpha=8, bias=bias, target_modules=["c_attn"],
                                                       fan_in_fan_out=True)).eval()
    perturb(model, 0.2)
    assert any(n.endswith("c_attn.base_layer.bias") and p.requires_grad for n, p in model.named_parameters())
    model.save_pretrained(str(tmp_path / "adapter"))
    convert_to_lora(tmp_path / "adapter", tmp_path / "lora", rank=4, progress=False)
    x = ids()
    torch.testing.assert_close(logits(stock_lora(_auto(base_dir), str(tmp_path / "lora")), x), logits(model, x),
                               atol=1e-4, rtol=1e-4)


def test_stock_peft_loads_without_specpeft(llama_dir: str, trained: dict, tmp_path) -> None:
    """A fresh interpreter that never imports specpeft loads the converted adapters with stock peft."""
    x = ids()
    cases = {}
    for method, rank in (("svfit", 4), ("tera", 32), ("soka", 32)):
        adapter, expected, _ = trained[method]
        convert_to_lora(adapter, tmp_path / f"{method}_lora", rank=rank, progress=False)
        cases[method] = str(tmp_path / f"{method}_lora")
        torch.save(expected, tmp_path / f"{method}.pt")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        x = torch.load({str(tmp_path / "x.pt")!r})
        out = {{}}
        for method, path in {cases!r}.items():
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({llama_dir!r}), path).eval()
            with torch.no_grad():
                got = model(input_ids=x).logits
            out[method] = float((got - torch.load({str(tmp_path)!r} + f"/{{method}}.pt")).abs().max())
        assert not any(name.startswith("specpeft") for name in sys.modules), "specpeft was imported"
        print(json.dumps(out))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(errors) == set(cases) and max(errors.values()) < 1e-4, errors
