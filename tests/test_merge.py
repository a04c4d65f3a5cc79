"""`specpeft merge` and `inspect` against the adapter model they export, on tiny models saved to disk.

References: the live adapter model's outputs (peft forward), dense float64 ΔW from the live layers, and the
saved base files (untouched tensors must be byte-identical).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import specpeft
from adapter_matrix import ConvNet, _tiny_bert, _tiny_gpt2, _tiny_llama, adapted, perturb
from specpeft.merge import load_saved_adapter, match_keys, merge_adapter
from specpeft.merge.output import staged_output
from specpeft.merge.inspection import inspect_adapter, plot_spectra

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
# Small per-method options (a method missing here runs with its defaults).
SMALL: dict[str, dict[str, Any]] = {
    "svfit": dict(r=4),
    "flora": dict(r=4, scale=2.0),
    "soka": dict(r=2),
    "snella": dict(low_rank_dim=4, init_sparsity=0.3),
    "tera": dict(rank=4),
    "fedsvd": dict(r=4),
}
PERTURB = {"snella": 0.5}  # SNELLA's code-mode ΔW is tiny; a larger step makes it visible in the outputs


# -- helpers shared by test_merge_lora.py and test_cli.py ------------------------------------------------------------


def method_config(name: str, targets: list[str] | str, **extra: Any) -> Any:
    return specpeft.get_method(name).config_cls(target_modules=targets, **{**SMALL.get(name, {}), **extra})


def ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(7))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def save_tiny(build: Any, path: str, shard: str | None = None) -> str:
    torch.manual_seed(1234)
    model = build().eval()
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def train_and_save(base: nn.Module, config: Any, path: str, scale: float = 0.1) -> Any:
    """Wrap, perturb every trainable (a stand-in for training), save; returns the adapter model."""
    model = specpeft.get_adapter_model(base, config).eval()
    perturb(model, scale)
    model.save_pretrained(path)
    return model


def digest(directory: str) -> dict[str, str]:
    """sha256 of every file under `directory` (relative paths)."""
    result = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                result[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return result


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(_tiny_llama, str(tmp_path_factory.mktemp("llama")), shard="20KB")


def _auto(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


# -- merge ------------------------------------------------------------------------------------------------------------


METHOD_CASES = [pytest.param(m, {}, id=m) for m in specpeft.list_methods()] + [
    pytest.param("tera", {"save_shared_factors": True}, id="tera-saved-factors")]


@pytest.mark.parametrize("method,extra", METHOD_CASES)
def test_merge_and_inspect_every_method(method: str, extra: dict, llama_dir: str, tmp_path) -> None:
    """merge reproduces the adapter model's outputs; inspect's numbers equal a dense float64 computation."""
    model = train_and_save(_auto(llama_dir), method_config(method, LLAMA_TARGETS, modules_to_save=["lm_head"], **extra),
                           str(tmp_path / "adapter"), PERTURB.get(method, 0.1))
    if extra.get("save_shared_factors"):  # the shared Tucker factors come from the file, not from the seed
        assert any(".tera_shared." in key for key in load_saved_adapter(tmp_path / "adapter").files.keys)
    x = ids()
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(_auto(llama_dir), x), atol=1e-4), "the adapter changes nothing"
    result = merge_adapter(llama_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert len(result.merged) == 6 and result.replaced == ["lm_head.weight"] and result.shards > 1
    merged = _auto(str(tmp_path / "merged"))
    torch.testing.assert_close(logits(merged, x), expected, atol=1e-4, rtol=1e-4)
    # untouched tensors are copied bit for bit, in the base's shard layout
    with open(os.path.join(llama_dir, "model.safetensors.index.json")) as fh:
        base_map = json.load(fh)["weight_map"]
    with open(tmp_path / "merged" / "model.safetensors.index.json") as fh:
        assert json.load(fh)["weight_map"] == base_map
    key = "model.layers.0.mlp.up_proj.weight"
    with safe_open(os.path.join(llama_dir, base_map[key]), "pt") as a, \
            safe_open(str(tmp_path / "merged" / base_map[key]), "pt") as b:
        assert torch.equal(a.get_tensor(key), b.get_tensor(key))
    check_inspect(model, inspect_adapter(tmp_path / "adapter", base=llama_dir, progress=False), tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("method", ["svfit", "fedsvd"])
def test_merge_other_layouts(family: str, method: str, tmp_path) -> None:
    """GPT-2's Conv1D stores (in, out); BERT is an encoder loaded with AutoModel."""
    from transformers import AutoModel

    build, targets = {"gpt2": (_tiny_gpt2, ["c_attn", "c_fc"]), "bert": (_tiny_bert, ["query", "value", "intermediate.dense"])}[family]
    base_dir = save_tiny(build, str(tmp_path / "base"))
    loader = _auto if family == "gpt2" else (lambda p: AutoModel.from_pretrained(p).eval())
    model = train_and_save(loader(base_dir), method_config(method, targets), str(tmp_path / "adapter"))
    merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    x = ids()
    torch.testing.assert_close(logits(loader(str(tmp_path / "merged")), x), logits(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,extra", [("svfit", dict(targets=["c_attn", "lm_head"])),
                                          ("fedsvd", dict(targets=["c_attn"], modules_to_save=["wte"]))],
                         ids=["lm_head-adapted", "embedding-saved"])
def test_merge_unties_word_embeddings_the_adapter_changes(method: str, extra: dict, tmp_path) -> None:
    """GPT-2 stores its tied lm_head/wte once. An adapter on lm_head (or a trained wte, while lm_head kept the
    original) needs both written and the tie dropped, else transformers re-ties one to the other's values."""
    base_dir = save_tiny(_tiny_gpt2, str(tmp_path / "base"))
    config = method_config(method, extra["targets"], **({"modules_to_save": extra["modules_to_save"]}
                                                         if "modules_to_save" in extra else {}))
    model = train_and_save(_auto(base_dir), config, str(tmp_path / "adapter"), 0.3)
    x = ids()
    result = merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert any("tie_word_embeddings is false" in note for note in result.notes)
    merged = _auto(str(tmp_path / "merged"))
    assert merged.lm_head.weight.data_ptr() != merged.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(logits(merged, x), logits(model, x), atol=1e-4, rtol=1e-4)
    untouched = train_and_save(_auto(base_dir), method_config(method, ["c_attn"]), str(tmp_path / "plain"))
    merge_adapter(base_dir, tmp_path / "plain", tmp_path / "plain_merged", progress=False)
    with open(tmp_path / "plain_merged" / "config.json") as fh:  # an adapter off the embeddings keeps the tie
        assert json.load(fh).get("tie_word_embeddings", True)
    torch.testing.assert_close(logits(_auto(str(tmp_path / "plain_merged")), x), logits(untouched, x), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("method", [m for m in specpeft.list_methods()
                                    if getattr(specpeft.get_method(m).adapter_cls, "supported_kinds", ()) and
                                    "conv2d" in specpeft.get_method(m).adapter_cls.supported_kinds])
def test_merge_plain_torch_convnet(method: str, tmp_path) -> None:
    """A non-transformers model saved as model.safetensors: strided, grouped, dilated and 1×1 convs."""
    torch.manual_seed(0)
    base = ConvNet().eval()
    os.makedirs(tmp_path / "base")
    save_file(base.state_dict(), str(tmp_path / "base" / "model.safetensors"))
    targets = ["stem", "down", "grouped", "dilated", "point"]
    model = train_and_save(copy.deepcopy(base), method_config(method, targets), str(tmp_path / "adapter"))
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = ConvNet().eval()
    merged.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")))
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)


def test_prefix_mismatch_between_adapter_and_base(tmp_path) -> None:
    """Adapter trained on LlamaForCausalLM (`model.layers...`), base saved as LlamaModel (`layers...`), and back."""
    from transformers import AutoModel

    causal_dir = save_tiny(_tiny_llama, str(tmp_path / "causal"))
    bare_dir = str(tmp_path / "bare")
    _auto(causal_dir).model.save_pretrained(bare_dir)
    model = train_and_save(_auto(causal_dir), method_config("svfit", ["q_proj"]), str(tmp_path / "adapter"))
    merge_adapter(bare_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    x = ids()
    with torch.no_grad():
        expected = model.base_model.model.model(input_ids=x).last_hidden_state
        torch.testing.assert_close(merged(input_ids=x).last_hidden_state, expected, atol=1e-4, rtol=1e-4)
    # the reverse direction: an adapter on the bare model merged into the causal-LM checkpoint
    bare_model = train_and_save(AutoModel.from_pretrained(bare_dir).eval(), method_config("svfit", ["q_proj"]),
                                str(tmp_path / "adapter2"))
    merge_adapter(causal_dir, tmp_path / "adapter2", tmp_path / "merged2", progress=False)
    with torch.no_grad():
        got = _auto(str(tmp_path / "merged2")).model(input_ids=x).last_hidden_state
        torch.testing.assert_close(got, bare_model(input_ids=x).last_hidden_state, atol=1e-4, rtol=1e-4)


def test_match_keys_rules() -> None:
    assert match_keys(["a.b.weight"], {"a.b.weight", "x"}) == {"a.b.weight": "a.b.weight"}
    assert match_keys(["layers.0.q.weight", "head.weight"], {"model.layers.0.q.weight", "model.head.weight"}) == {
        "layers.0.q.weight": "model.layers.0.q.weight", "head.weight": "model.head.weight"}
    with pytest.raises(ValueError, match="'classifier.weight'.*Close keys"):
        match_keys(["bert.q.weight", "classifier.weight"], {"q.weight", "classifier_x.weight"})


def test_dtype_option_and_bf16_base(llama_dir: str, tmp_path) -> None:
    model = train_and_save(_auto(llama_dir), method_config("svfit", LLAMA_TARGETS), str(tmp_path / "adapter"))
    merge_adapter(llama_dir, tmp_path / "adapter", tmp_path / "bf16", dtype="bf16", progress=False)
    tensors = load_file(str(tmp_path / "bf16" / "model-00001-of-00005.safetensors"))
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    with open(tmp_path / "bf16" / "config.json") as fh:
        assert json.load(fh)["dtype"] == "bfloat16"
    merge_adapter(llama_dir, tmp_path / "adapter", tmp_path / "fp32", progress=False)
    x = ids()
    fp32 = logits(_auto(str(tmp_path / "fp32")), x)
    bf16 = logits(_auto(str(tmp_path / "bf16")).float(), x)
    # the bf16 copy is the fp32 merge rounded once: its outputs match within bf16 precision, not better
    assert 0 < (bf16 - fp32).abs().max() < 0.05
    # "auto" keeps a bf16 base in bf16: the merged weight is round(W + ΔW), computed in fp32
    bf16_base = str(tmp_path / "bf16_base")
    _auto(llama_dir).to(torch.bfloat16).save_pretrained(bf16_base)
    merge_adapter(bf16_base, tmp_path / "adapter", tmp_path / "auto", progress=False)
    key = "model.layers.1.self_attn.q_proj"
    merged = _auto(str(tmp_path / "auto")).get_submodule(key).weight
    base_weight = _auto(bf16_base).get_submodule(key).weight
    layer = dict(adapted(model))[f"base_model.model.{key}"]
    expected = (base_weight.float() + layer.get_delta_weight("default")).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected)


def _bnb_llama() -> nn.Module:
    """A tiny Llama whose linears bitsandbytes' CPU inference layout takes (d_out % 32 == 0, d_in % 64 == 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64))


@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_checkpoint_merges_into_dequantized_copy(bits: int, tmp_path) -> None:
    """QLoRA-style: adapter trained on the quantized model; its saved checkpoint merges to dequant(W_q) + ΔW."""
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    llama_dir = save_tiny(_bnb_llama, str(tmp_path / "base"))
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
             if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    load_q = lambda: AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quant,  # noqa: E731
                                                          device_map="cpu").eval()
    q_dir = str(tmp_path / "quantized")
    load_q().save_pretrained(q_dir)
    model = train_and_save(load_q(), method_config("svfit", LLAMA_TARGETS), str(tmp_path / "adapter"))
    assert all(r["layer"]["quantized"] for r in load_saved_adapter(tmp_path / "adapter").config["layer_records"].values())
    result = merge_adapter(q_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert len(result.dequantized) == 14  # every linear of both blocks (lm_head stays dense)
    with open(tmp_path / "merged" / "config.json") as fh:
        assert "quantization_config" not in json.load(fh)
    merged = _auto(str(tmp_path / "merged"))
    quantized = load_q()
    with torch.no_grad():
        for name, layer in adapted(model):
            key = name.removeprefix("base_model.model.")
            expected = layer.get_base_weight().float() + layer.get_delta_weight("default")
            torch.testing.assert_close(merged.get_submodule(key).weight, expected, atol=1e-6, rtol=0)
        k_proj = quantized.model.layers[0].self_attn.k_proj  # not adapted: plainly dequantized
        state = k_proj.weight.quant_state if bits == 4 else k_proj.state
        expected = dequantize_bnb_weight(k_proj.weight, state=state)
        torch.testing.assert_close(merged.model.layers[0].self_attn.k_proj.weight, expected.float(), atol=1e-6, rtol=0)
    if bits == 4:  # the nf4 forward dequantizes: the merged model reproduces the adapter model's outputs
        x = ids()  # in train mode (no dropout here): eval no-grad forwards may take bitsandbytes' bf16 CPU layout
        torch.testing.assert_close(logits(merged, x), logits(model.train(), x), atol=1e-4, rtol=1e-4)
    # onto the full-precision base instead: allowed, but the user is told it is not the training-time weight
    with pytest.warns(UserWarning, match="bitsandbytes-quantized"):
        result = merge_adapter(llama_dir, tmp_path / "adapter", tmp_path / "dense", progress=False)
    assert any("dequant(quant(W))" in note for note in result.notes)


def test_lora_and_dora_files_merge_like_peft(llama_dir: str, tmp_path) -> None:
    """Plain peft LoRA files (rsLoRA, alpha_pattern, an embedding, DoRA): the merge equals peft's merge_and_unload."""
    from peft import LoraConfig, get_peft_model

    for name, config in {
        "lora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"v_proj": 3.0},
                           target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    }.items():
        model = get_peft_model(_auto(llama_dir), config).eval()
        perturb(model, 0.2)
        model.save_pretrained(str(tmp_path / name))
        merge_adapter(llama_dir, tmp_path / name, tmp_path / f"{name}_merged", progress=False)
        x = ids()
        expected = logits(model, x)
        reference = logits(model.merge_and_unload(), x)
        torch.testing.assert_close(reference, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits(_auto(str(tmp_path / f"{name}_merged")), x), expected, atol=1e-4, rtol=1e-4)


# -- inspect ----------------------------------------------------------------------------------------------------------


def check_inspect(model: nn.Module, summary: Any, tmp_path: Any) -> None:
    """Every statistic of `summary` against the live adapter model's ΔW in float64."""
    live = {name.removeprefix("base_model.model."): layer for name, layer in model.named_modules()
            if hasattr(layer, "get_delta_weight") and hasattr(layer, "base_layer")}
    assert summary.method == model.peft_config["default"].peft_type
    assert {s.name for s in summary.layers} == set(live)
    eps = torch.finfo(torch.float32).eps
    for stats in summary.layers:
        layer = live[stats.name]
        with torch.no_grad():
            delta = layer.get_delta_weight("default").double()
        delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
        sigma = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        p = sigma[sigma > 0] / sigma.sum()
        assert stats.delta_norm == pytest.approx(float(delta.norm()), rel=1e-5)
        assert stats.spectral_norm == pytest.approx(float(sigma[0]), rel=1e-5)
        assert stats.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-3)
        assert stats.rank == int((sigma > sigma[0] * max(delta.shape[0], delta[0].numel()) * eps).sum())
        if summary.method == "LORA":  # a LoRA file does not record which factor was frozen (FedSVD's A)
            assert stats.trainable == sum(p.numel() for n, p in layer.named_parameters() if ".lora_" in f".{n}")
        else:
            assert stats.trainable == sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert stats.base_norm == pytest.approx(float(layer.get_base_layer().weight.double().norm()), rel=1e-6)
    if summary.method == "SVFIT":
        assert all(s.rank == 4 for s in summary.layers)  # U diag(s − σ⁰) Vᵀ has rank r
        plot_spectra(summary, tmp_path / "spectra.png")
        with open(tmp_path / "spectra.png", "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_config_this_transformers_cannot_build_leaves_the_tie_unknown(tmp_path) -> None:
    """A base whose config.json names a model_type this transformers lacks still merges an adapter that never
    touches the embeddings (the tie lookup is only a lookup)."""
    base_dir = save_tiny(_tiny_gpt2, str(tmp_path / "base"))
    with open(os.path.join(base_dir, "config.json")) as fh:
        config = json.load(fh)
    model = train_and_save(_auto(base_dir), method_config("svfit", ["c_attn"]), str(tmp_path / "adapter"))
    config["model_type"] = "gpt2_from_the_future"  # AutoConfig refuses it; the architecture is still GPT-2's
    with open(os.path.join(base_dir, "config.json"), "w") as fh:
        json.dump(config, fh)
    merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    with open(tmp_path / "merged" / "config.json") as fh:
        restored = {**json.load(fh), "model_type": "gpt2"}
    with open(tmp_path / "merged" / "config.json", "w") as fh:
        json.dump(restored, fh)
    x = ids()
    torch.testing.assert_close(logits(_auto(str(tmp_path / "merged")), x), logits(model, x), atol=1e-4, rtol=1e-4)


def test_a_tied_lm_head_on_a_base_without_config_json_names_the_missing_file(tmp_path) -> None:
    """GPT-2 stores lm_head once, as wte; without config.json the tie cannot be looked up, and the error says so."""
    base_dir = save_tiny(_tiny_gpt2, str(tmp_path / "base"))
    train_and_save(_auto(base_dir), method_config("svfit", ["c_attn", "lm_head"]), str(tmp_path / "adapter"))
    os.remove(os.path.join(base_dir, "config.json"))
    with pytest.raises(ValueError, match="'lm_head.weight' matches no tensor.*has no config.json: if the missing key "
                                         "is an output embedding.*copy the model's config.json"):
        merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert not os.path.exists(tmp_path / "merged")


def test_an_fp64_base_merges_in_fp64(tmp_path) -> None:
    """An fp64 checkpoint keeps its precision: each merged weight is W + ΔW added in fp64 (ΔW as the adapter file
    gives it, fp32), bit for bit, not rounded through fp32 on the way."""
    base_dir = save_tiny(lambda: _tiny_llama().double(), str(tmp_path / "base"))
    model = train_and_save(_auto(base_dir), method_config("svfit", LLAMA_TARGETS), str(tmp_path / "adapter"))
    merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = _auto(str(tmp_path / "merged"))
    base = _auto(base_dir)
    for name, layer in adapted(model):
        key = name.removeprefix("base_model.model.")
        weight = merged.get_submodule(key).weight
        expected = base.get_submodule(key).weight + layer.get_delta_weight("default").float().double()
        assert weight.dtype == torch.float64 and torch.equal(weight, expected), key


def test_a_symlinked_out_is_replaced_and_the_directory_it_named_kept(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("kept")
    link = tmp_path / "out"
    link.symlink_to(elsewhere)
    with staged_output(str(link), overwrite=True, inputs=[]) as staging:
        open(os.path.join(staging, "new.txt"), "w").close()
    assert not link.is_symlink() and (link / "new.txt").exists() and (elsewhere / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]  # no stale .out.old-* link
