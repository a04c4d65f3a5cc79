"""Public API behaviour: config files, errors that name the problem, third-party methods, Trainer integration."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import specpeft
from adapter_matrix import MLP, MODEL_CASES, perturb
from adapter_matrix import adapted as adapted_layers
from specpeft import FrozenBase, LayerGeometry, MethodAdapter, SpecPeftConfig, SVFitConfig


def _mlp() -> nn.Module:
    return MODEL_CASES["mlp"].model()


def test_list_methods_includes_svfit() -> None:
    assert "svfit" in specpeft.list_methods()
    assert "svfit" in specpeft.list_methods(details=True)


def test_config_json_round_trip_and_path_input(tmp_path) -> None:
    config = SVFitConfig(target_modules=["lin0"], r=3, svd=specpeft.SVDInit(kind="randomized", niter=2))
    config.save_pretrained(tmp_path)
    loaded = SVFitConfig.from_pretrained(tmp_path)
    assert loaded.svd == config.svd and loaded.r == 3 and loaded.peft_type == "SVFIT"
    from_file = SVFitConfig.from_json_file(os.path.join(tmp_path, "adapter_config.json"))
    assert from_file.target_modules == ["lin0"]
    model = specpeft.get_adapter_model(_mlp(), os.path.join(tmp_path, "adapter_config.json"))
    assert model.base_model.model.lin0.svfit_adapter["default"].rank == 3
    # from_pretrained marks a config as describing a checkpoint; get_adapter_model still trains a fresh adapter
    fresh = specpeft.get_adapter_model(_mlp(), loaded).base_model.model.lin0.svfit_adapter["default"]
    assert fresh.U.abs().sum() > 0 and fresh.rank == 3
    assert config.layer_records == {}, "get_adapter_model must not write into the user's config"


def test_saved_adapter_dir_seeds_a_fresh_trainable_adapter(tmp_path) -> None:
    """peft saves configs with inference_mode on, and their records are the old run's: a fresh adapter from a saved
    directory still trains, and is initialized for the model it is given (here one of another width)."""
    trained = specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"], r=3))
    trained.save_pretrained(tmp_path)
    for source in (str(tmp_path), specpeft.load_config(tmp_path),
                   SVFitConfig.from_json_file(os.path.join(tmp_path, "adapter_config.json"))):
        fresh = specpeft.get_adapter_model(_mlp(), source)
        trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
        assert trainable == ["base_model.model.lin0.svfit_adapter.default.s"]
    wider = nn.Sequential()
    wider.add_module("lin0", nn.Linear(12, 20))
    other = specpeft.get_adapter_model(wider, str(tmp_path)).base_model.model.lin0.svfit_adapter["default"]
    assert other.U.shape == (20, 3)


@pytest.mark.parametrize("config_cls", [SVFitConfig, specpeft.SoKAConfig])
def test_an_initializer_error_names_the_layer(config_cls) -> None:
    model = _mlp()
    with torch.no_grad():
        model.lin1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{config_cls.__name__}, layer 'lin1': .*NaN or Inf"):
        specpeft.get_adapter_model(model, config_cls(target_modules=["lin0", "lin1"]))


def _structure(model: nn.Module) -> tuple[list[tuple[str, int]], dict[str, bool]]:
    """Every submodule's name and object identity, and every parameter's requires_grad."""
    return ([(name, id(module)) for name, module in model.named_modules()],
            {name: p.requires_grad for name, p in model.named_parameters()})


@pytest.mark.parametrize("failure", ["initializer", "budget"])
def test_a_failed_injection_leaves_the_model_as_it_was(failure: str) -> None:
    """An error during get_adapter_model (a NaN weight on the second layer; a SoKA budget checked after all layers are
    built) puts back every replaced module and requires_grad flag; on an adapted model, add_adapter's failure removes
    only the new adapter."""
    model = _mlp()
    model.lin0.weight.requires_grad_(False)  # a user's own choice, kept
    if failure == "initializer":
        with torch.no_grad():
            model.lin1.weight[0, 0] = float("nan")
        config = specpeft.SoKAConfig(target_modules=["lin0", "lin1"])
    else:
        config = specpeft.SoKAConfig(target_modules=["lin0", "lin1"], max_rank=None, param_budget=1)
    before = _structure(model)
    with pytest.raises(ValueError, match="NaN or Inf" if failure == "initializer" else "param_budget=1"):
        specpeft.get_adapter_model(model, config)
    assert _structure(model) == before

    adapted = specpeft.get_adapter_model(_mlp(), specpeft.SoKAConfig(target_modules=["lin0", "lin1"]))
    x = torch.randn(3, 24)
    expected, before = adapted(x), _structure(adapted)
    with pytest.raises(ValueError, match="param_budget=1"):
        adapted.add_adapter("second", specpeft.SoKAConfig(target_modules=["lin0", "lin1"], max_rank=None, param_budget=1))
    assert _structure(adapted) == before and "second" not in adapted.peft_config
    assert all("second" not in layer.adapters for _, layer in adapted_layers(adapted))
    torch.testing.assert_close(adapted(x), expected, atol=0, rtol=0)


def test_failed_fedsvd_and_modules_to_save_injections_are_rolled_back() -> None:
    """FedSVD (built on peft LoRA) rolls back too, and a failed second adapter leaves no saved-module copy behind."""
    from specpeft.adapters.fedsvd import add_fedsvd_adapter

    model = _mlp()
    before = _structure(model)
    with pytest.raises(ValueError, match="r=30"):
        specpeft.get_adapter_model(model, specpeft.FedSVDConfig(target_modules=["lin0", "lin1"], r=30))
    assert _structure(model) == before
    fedsvd = specpeft.get_adapter_model(_mlp(), specpeft.FedSVDConfig(target_modules=["lin0", "lin1"], r=4))
    before, keys = _structure(fedsvd), set(fedsvd.state_dict())
    with pytest.raises(ValueError, match="r=30"):
        add_fedsvd_adapter(fedsvd, "second", specpeft.FedSVDConfig(target_modules=["lin0"], r=30))
    assert _structure(fedsvd) == before and set(fedsvd.state_dict()) == keys and "second" not in fedsvd.peft_config

    adapted = specpeft.get_adapter_model(_mlp(), specpeft.SoKAConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    before, keys = _structure(adapted), set(adapted.state_dict())
    with pytest.raises(ValueError, match="param_budget=1"):
        adapted.add_adapter("second", specpeft.SoKAConfig(target_modules=["lin0"], modules_to_save=["lin1"],
                                                          max_rank=None, param_budget=1))
    assert _structure(adapted) == before and set(adapted.state_dict()) == keys


def test_low_cpu_mem_usage_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True is not supported.*Drop the option"):
        specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"]), low_cpu_mem_usage=True)
    specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True is not supported"):
        specpeft.load_adapter_model(_mlp(), tmp_path, low_cpu_mem_usage=True)


def test_user_config_is_never_mutated() -> None:
    config = SVFitConfig(target_modules=["lin0", "lin1"])
    before = copy.deepcopy(config.__dict__)
    model = specpeft.get_adapter_model(_mlp(), config)
    model.add_adapter("second", config)
    assert config.__dict__ == before
    saved = model.peft_config["default"].layer_records
    assert set(saved) == {"lin0", "lin1"} and all("r" in rec and "layer" in rec for rec in saved.values())


def test_unknown_json_key_warns_and_wrong_type_fails(tmp_path) -> None:
    config = SVFitConfig(target_modules=["lin0"])
    config.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_config.json")
    data = json.load(open(path))
    data["option_from_the_future"] = 1
    json.dump(data, open(path, "w"))
    with pytest.warns(UserWarning, match="option_from_the_future"):
        SVFitConfig.from_json_file(path)
    data["energy_threshold"] = "high"
    json.dump(data, open(path, "w"))
    with pytest.raises(TypeError, match="energy_threshold"):
        SVFitConfig.from_json_file(path)


def test_unknown_option_in_constructor_names_it() -> None:
    with pytest.raises(TypeError, match="rank_threshold"):
        SVFitConfig(target_modules=["lin0"], rank_threshold=0.9)


def test_target_matching_nothing_lists_close_names() -> None:
    with pytest.raises(ValueError, match=r"lin0.*Fix target_modules"):
        specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin_0"]))


def test_missing_targets_explains_fix() -> None:
    with pytest.raises(ValueError, match="target_modules is not set"):
        specpeft.get_adapter_model(_mlp(), SVFitConfig())


def test_unsupported_layer_type_names_module() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(TypeError, match="Module '0' is a Embedding"):
        specpeft.get_adapter_model(model, SVFitConfig(target_modules=["0"]))


def test_adapter_name_with_prefix_is_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="contains the method prefix"):
        specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"]), adapter_name="svfit_run")
    # a name that merely contains the method's name ("svfit", no underscore) saves and reloads
    model = specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"]), adapter_name="svfitness")
    perturb(model, 0.3)
    model.save_pretrained(str(tmp_path))
    reloaded = specpeft.load_adapter_model(_mlp(), tmp_path / "svfitness", adapter_name="svfitness")
    x = torch.randn(3, 24)
    torch.testing.assert_close(reloaded(x), model(x), atol=0, rtol=0)


def test_a_config_read_by_from_pretrained_must_get_its_checkpoint(tmp_path) -> None:
    """`SVFitConfig.from_pretrained` describes a checkpoint (no initializer runs); an adapter built from it without
    loading one is refused at its first forward or merge instead of training silently from zeros."""
    import peft

    specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"])).save_pretrained(str(tmp_path))
    config = SVFitConfig.from_pretrained(str(tmp_path))
    model = peft.get_peft_model(_mlp(), config)
    with pytest.raises(ValueError, match="layer 'lin0'.*no checkpoint was loaded into it"):
        model(torch.randn(3, 24))
    with pytest.raises(ValueError, match="no checkpoint was loaded into it"):
        model.merge_and_unload()
    loaded = peft.PeftModel.from_pretrained(_mlp(), str(tmp_path))  # the same config class, then the tensors
    loaded(torch.randn(3, 24))


def test_adapters_load_from_a_subfolder_and_a_hub_repo_id(tmp_path) -> None:
    """As peft's LoRA: `subfolder=` and a Hub repo id (here found in a local Hub cache, no network)."""
    import shutil

    model = specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"]))
    perturb(model, 0.3)
    model.save_pretrained(str(tmp_path / "saved" / "task"))
    x = torch.randn(3, 24)
    expected = model(x)
    from_subfolder = specpeft.load_adapter_model(_mlp(), tmp_path / "saved", subfolder="task")
    torch.testing.assert_close(from_subfolder(x), expected, atol=0, rtol=0)
    commit = "0" * 40  # the cache layout hf_hub_download reads: models--{org}--{name}/snapshots/{commit}/...
    repo = tmp_path / "cache" / "models--someone--svfit-adapter"
    shutil.copytree(tmp_path / "saved" / "task", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    from_hub = specpeft.load_adapter_model(_mlp(), "someone/svfit-adapter", cache_dir=str(tmp_path / "cache"),
                                           local_files_only=True)
    torch.testing.assert_close(from_hub(x), expected, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="not a local directory, and the Hugging Face Hub repo 'nobody/none'"):
        specpeft.load_adapter_model(_mlp(), "nobody/none", cache_dir=str(tmp_path / "cache"), local_files_only=True)


def test_mixed_batch_adapter_names_are_refused() -> None:
    model = specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"]))
    model.add_adapter("other", SVFitConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="`adapter_names`.*set_adapter"):
        model(torch.randn(2, 24), adapter_names=["default", "other"])


def test_no_match_errors_name_the_option_that_removed_the_targets(tmp_path) -> None:
    with pytest.raises(ValueError, match="target_modules=\\['lin0'\\] together with exclude_modules selects nothing"):
        specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"], exclude_modules=["lin0"]))
    lora = specpeft.get_adapter_model(_mlp(), specpeft.FedSVDConfig(target_modules=["lin0"], r=2))
    lora.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="stock peft LORA config.*FedSVDConfig\\(r=2"):
        specpeft.get_adapter_model(_mlp(), str(tmp_path))


def test_wrong_shaped_checkpoint_names_key(tmp_path) -> None:
    model = specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"], r=4))
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_config.json")
    data = json.load(open(path))
    data["layer_records"]["lin0"]["r"] = 5  # config and tensors disagree, as with a file for another model
    json.dump(data, open(path, "w"))
    with pytest.raises(RuntimeError, match=r"(?s)does not fit this model.*lin0\.svfit_adapter\.default\.s"):
        specpeft.load_adapter_model(_mlp(), tmp_path)


def test_safe_merge_raises_on_nan() -> None:
    model = specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"]))
    with torch.no_grad():
        model.base_model.model.lin0.svfit_adapter["default"].s[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf.*lin0"):
        model.merge_and_unload(safe_merge=True)


def test_saved_layout_is_peft_layout(tmp_path) -> None:
    from safetensors import safe_open

    model = specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0"], r=4))
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert keys == {f"base_model.model.lin0.svfit_adapter.{t}" for t in ("U", "V", "sigma0", "s")}


def test_stock_peft_loads_in_fresh_process(tmp_path) -> None:
    """A new interpreter: `import specpeft` then plain `peft.PeftModel.from_pretrained` reproduces the outputs."""
    model = specpeft.get_adapter_model(_mlp(), SVFitConfig(target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.3)
    x = MODEL_CASES["mlp"].inputs()["x"]
    torch.save(model(x).detach(), tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "adapter")
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
import specpeft
from peft import PeftModel
from adapter_matrix import MODEL_CASES
case = MODEL_CASES["mlp"]
model = PeftModel.from_pretrained(case.model(), {str(tmp_path / "adapter")!r})
assert torch.equal(model(case.inputs()["x"]), torch.load({str(tmp_path / "expected.pt")!r})), "outputs differ"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# -- a third-party method through register_method ----------------------------------------------------------------


@dataclass
class RowScaleConfig(SpecPeftConfig):
    """Toy method: ΔW = diag(g) W, g trainable and zero at init."""

    METHOD = "ROWSCALE"


class RowScaleAdapter(MethodAdapter):
    supported_kinds = ("linear",)

    def __init__(self, geometry: LayerGeometry, weight: Tensor) -> None:
        super().__init__(geometry)
        self.register_buffer("w0", weight.float().clone())
        self.g = nn.Parameter(torch.zeros(geometry.out_features))

    @classmethod
    def create(cls, geometry, config, weight, record, name=""):
        return cls(geometry, weight if weight is not None else torch.zeros(geometry.weight_shape))

    def delta_weight(self) -> Tensor:
        return self.g[:, None] * self.w0  # (out, 1) * (out, in)


def test_register_third_party_method(tmp_path) -> None:
    if "rowscale" not in specpeft.list_methods():
        specpeft.register_method("rowscale", RowScaleConfig, RowScaleAdapter, description="toy")
    with pytest.raises(ValueError, match="already registered"):
        specpeft.register_method("rowscale", RowScaleConfig, RowScaleAdapter)
    with pytest.raises(ValueError, match="clashes with peft"):
        specpeft.register_method("lora", RowScaleConfig, RowScaleAdapter)

    class NoDelta(MethodAdapter):  # forgot delta_weight: refused at registration, naming what is missing
        create = RowScaleAdapter.create

    with pytest.raises(TypeError, match=r"NoDelta does not implement \['delta_weight'\]"):
        specpeft.register_method("nodelta", RowScaleConfig, NoDelta)
    model = specpeft.get_adapter_model(_mlp(), RowScaleConfig(target_modules=["lin0", "lin1"]))
    x = MODEL_CASES["mlp"].inputs()["x"]
    torch.testing.assert_close(model(x), _mlp()(x), atol=0, rtol=0)
    with torch.no_grad():
        model.base_model.model.lin0.rowscale_adapter["default"].g.fill_(0.5)
    expected = model(x)
    ref = _mlp()
    with torch.no_grad():
        ref.lin0.weight.mul_(1.5)
    torch.testing.assert_close(expected, ref(x), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = specpeft.load_adapter_model(_mlp(), tmp_path)
    torch.testing.assert_close(reloaded(x), expected, atol=0, rtol=0)


def test_frozen_base_forward_with_delta_matches_dense() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    delta = torch.randn_like(conv.weight) * 0.1
    x = torch.randn(2, 4, 9, 9)
    expected = nn.functional.conv2d(x, conv.weight + delta, conv.bias, 2, 1, 1, 2)
    torch.testing.assert_close(FrozenBase(conv).forward_with_delta(x, delta), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [m for m in specpeft.list_methods() if m != "fedsvd"])
def test_merge_of_a_float64_model_is_exact_in_float64(method: str) -> None:
    """model.double(): merge and unmerge add and subtract ΔW in fp64 (an fp32 round trip would leave ~1e-8)."""
    from method_configs import small_config

    model = specpeft.get_adapter_model(_mlp(), small_config(method, ["lin0", "lin1"])).double()
    perturb(model, 0.3)
    layers = adapted_layers(model)
    before = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers}
    expected = {name: before[name] + layer.get_delta_weight("default") for name, layer in layers}
    model.merge_adapter()
    for name, layer in layers:
        assert layer.get_base_layer().weight.dtype == torch.float64
        torch.testing.assert_close(layer.get_base_layer().weight, expected[name], atol=1e-15, rtol=1e-15)
    model.unmerge_adapter()
    for name, layer in layers:
        torch.testing.assert_close(layer.get_base_layer().weight, before[name], atol=1e-15, rtol=1e-15)


@pytest.mark.parametrize("method", ["svfit", "soka", "flora"])
def test_merge_writes_through_a_weight_norm_parametrization(method: str) -> None:
    """A weight-normed conv (wav2vec2's positional conv) recomputes its weight from (g, v) on every read: merge
    writes W + ΔW through the parametrization (a plain write was lost while the layer counted as merged)."""
    from torch.nn.utils.parametrizations import weight_norm

    from method_configs import small_config

    class PositionalConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = weight_norm(nn.Conv1d(8, 8, 5, padding=2), name="weight", dim=2)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x)

    torch.manual_seed(0)
    adapted = specpeft.get_adapter_model(PositionalConv(), small_config(method, ["conv"]))
    perturb(adapted, 0.3)
    x = torch.randn(2, 8, 11, generator=torch.Generator().manual_seed(1))
    expected = adapted(x)
    (_, layer), = adapted_layers(adapted)
    before = layer.get_base_layer().weight.detach().clone()
    adapted.merge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, before + layer.get_delta_weight("default"),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-5)
    adapted.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapted.merge_and_unload()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_cpu_packed_4bit_base_weight_reads_as_the_packed_forward_uses_it(compress_statistics: bool) -> None:
    """bitsandbytes repacks a 4-bit weight in place on its first eval, no-grad CPU forward where AVX512-bf16 exists
    (absmax to bf16, transposed); peft's dequantization misreads that layout. The pack is done by hand here, so the
    test runs on any CPU: with several blocks per row, one column block 8× larger, plain and double-quantized
    statistics, the read equals dequant(W_q) with the bf16 absmax, and the module keeps its packed layout."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from peft.utils.integrations import dequantize_bnb_weight

    if not hasattr(bnbf, "_convert_weight_packed_for_cpu"):
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU inference layout")
    torch.manual_seed(0)
    dense = torch.randn(64, 256) * 0.05
    dense[:, 64:128] *= 8.0  # blocks of very different scale: a block read with another's absmax shows
    model = nn.Sequential(bnb.nn.Linear4bit(256, 64, compute_dtype=torch.float32, quant_type="nf4"))
    model[0].weight = bnb.nn.Params4bit(dense.clone(), requires_grad=False, quant_type="nf4",
                                        compress_statistics=compress_statistics)
    model = model.to("cpu")  # quantizes
    weight = model[0].weight
    reference_state = copy.deepcopy(weight.quant_state)
    if reference_state.nested:  # the absmax the pack keeps: the double-quantized one, dequantized
        absmax = bnbf.dequantize_blockwise(reference_state.absmax, reference_state.state2) + reference_state.offset
        reference_state.nested = False
    else:
        absmax = reference_state.absmax
    reference_state.absmax = absmax.float().bfloat16().float()  # rounded to bf16 by the pack
    reference = bnbf.dequantize_4bit(weight.data.clone(), reference_state)
    adapted = specpeft.get_adapter_model(model, SVFitConfig(target_modules=["0"]))
    layer = adapted.base_model.model[0]
    weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    peft_read = dequantize_bnb_weight(weight, weight.quant_state).float()
    assert not torch.allclose(peft_read, reference, atol=1e-2)
    torch.testing.assert_close(layer.get_base_weight(), reference, atol=0, rtol=0)
    assert weight.quant_state.packing_format_for_cpu and weight.data.shape == (64, 128)  # still packed
    adapted.merge_and_unload()  # merges onto the read weight and re-quantizes
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    merged = bnbf.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state)
    assert ((merged - reference).norm() / reference.norm()).item() < 0.1  # one more 4-bit rounding


# -- transformers.Trainer --------------------------------------------------------------------------------------


def test_trainer_lowers_loss_with_svfit(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    case = MODEL_CASES["llama"]
    model = specpeft.get_adapter_model(case.model(), SVFitConfig(target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    pattern = torch.arange(16) % 7  # a learnable repeating sequence
    data = [{"input_ids": (pattern + int(torch.randint(0, 5, (1,), generator=gen))) % 96} for _ in range(32)]
    data = [{**d, "labels": d["input_ids"].clone()} for d in data]

    def loss_on(m) -> float:
        with torch.no_grad():
            batch = torch.stack([d["input_ids"] for d in data])
            return float(m(input_ids=batch, labels=batch).loss)

    before = loss_on(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3,
                             learning_rate=5e-2, weight_decay=0.0, report_to=[], logging_steps=100,
                             save_strategy="no", use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    after = loss_on(model)
    assert after < before - 0.05, (before, after)
