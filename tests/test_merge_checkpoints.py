"""Merging onto checkpoints whose names or layouts the adapter file alone does not tell: a resized vocabulary in
modules_to_save, a square Conv1D in a LoRA whose file records one fan_in_fan_out, transformers ≥ 5's renamed ViT
weights, ambiguous prefixes; and the notes and messages around them (a base-rewriting LoRA init, a folder of
several adapters, to-lora at energy 1)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import specpeft
from adapter_matrix import _tiny_gpt2, _tiny_llama, perturb
from specpeft.merge import convert_to_lora, load_saved_adapter, match_keys, merge_adapter
from test_merge import _auto, ids, logits, method_config, save_tiny, train_and_save


@pytest.mark.parametrize("method", ["svfit", "lora"])
def test_resized_vocabulary_in_modules_to_save_merges(method: str, tmp_path) -> None:
    """After resize_token_embeddings, peft also saves `X.modules_to_save.weight` and `X.original_module.weight`:
    the trained copy replaces the base tensor, the original is ignored."""
    from peft import LoraConfig, get_peft_model

    base_dir = save_tiny(_tiny_llama, str(tmp_path / "base"))
    resized = _auto(base_dir)
    resized.resize_token_embeddings(100)
    resized.save_pretrained(str(tmp_path / "resized"))
    to_save = ["embed_tokens", "lm_head"]
    if method == "lora":
        model = get_peft_model(resized, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=to_save)).eval()
    else:
        model = specpeft.get_adapter_model(resized, method_config(method, ["q_proj"], modules_to_save=to_save)).eval()
    perturb(model, 0.1)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert any(".original_module." in key for key in load_saved_adapter(tmp_path / "adapter").files.keys)
    result = merge_adapter(tmp_path / "resized", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert sorted(result.replaced) == ["lm_head.weight", "model.embed_tokens.weight"]
    x = ids()
    torch.testing.assert_close(logits(_auto(str(tmp_path / "merged")), x), logits(model, x), atol=1e-4, rtol=1e-4)


def test_square_conv1d_of_a_lora_takes_its_layout_from_the_architecture(tmp_path) -> None:
    """peft records fan_in_fan_out once per adapter (the last wrapped layer's: lm_head, a Linear, says False), but
    GPT-2's square attn.c_proj is a Conv1D stored (in, out)."""
    from peft import LoraConfig, get_peft_model

    base_dir = save_tiny(_tiny_gpt2, str(tmp_path / "base"))
    config = LoraConfig(r=4, target_modules=["c_attn", "c_proj", "lm_head"])
    model = get_peft_model(_auto(base_dir), config).eval()
    perturb(model, 0.2)
    model.save_pretrained(str(tmp_path / "adapter"))
    with open(tmp_path / "adapter" / "adapter_config.json") as fh:
        assert json.load(fh)["fan_in_fan_out"] is False  # the file alone would transpose the square c_proj
    merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    x = ids()
    torch.testing.assert_close(logits(_auto(str(tmp_path / "merged")), x), logits(model, x), atol=1e-4, rtol=1e-4)


def test_renamed_vit_weights_merge_under_their_saved_names(tmp_path) -> None:
    """transformers ≥ 5 loads ViT's `vit.encoder.layer.0.attention.attention.query` as
    `vit.layers.0.attention.q_proj`; the adapter is keyed by the latter, the merged file keeps the former."""
    from safetensors import safe_open
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
                       patch_size=4, num_labels=3)
    ViTForImageClassification(config).eval().save_pretrained(str(tmp_path / "base"))
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as fh:
        saved_keys = set(fh.keys())
    loaded = ViTForImageClassification.from_pretrained(str(tmp_path / "base")).eval()
    if "vit.layers.0.attention.q_proj.weight" not in loaded.state_dict() or \
            "vit.layers.0.attention.q_proj.weight" in saved_keys:
        pytest.skip("this transformers saves ViT under its in-memory names (nothing to translate)")
    model = train_and_save(loaded, method_config("svfit", ["q_proj", "v_proj"], modules_to_save=["classifier"]),
                           str(tmp_path / "adapter"))
    result = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in result.merged
    merged = ViTForImageClassification.from_pretrained(str(tmp_path / "merged")).eval()
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, model(pixel_values=pixels).logits,
                                   atol=1e-5, rtol=1e-5)


def test_two_complete_prefix_changes_are_ambiguous() -> None:
    """An encoder's adapter onto an encoder-decoder whose halves share layer names: refused, naming both."""
    available = {f"model.{side}.layers.0.q_proj.weight" for side in ("encoder", "decoder")}
    with pytest.raises(ValueError, match=r"several prefix changes \(add 'model.decoder.'; add 'model.encoder.'\)"):
        match_keys(["layers.0.q_proj.weight"], available)
    only_encoder = {"model.encoder.layers.0.q_proj.weight", "model.decoder.layers.0.k_proj.weight"}
    assert match_keys(["layers.0.q_proj.weight"], only_encoder) == {
        "layers.0.q_proj.weight": "model.encoder.layers.0.q_proj.weight"}


def test_a_base_rewriting_lora_init_is_noted(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    base_dir = save_tiny(_tiny_llama, str(tmp_path / "base"))
    model = get_peft_model(_auto(base_dir), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.warns(UserWarning, match="init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"):
        result = merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert any("pissa" in note for note in result.notes)


def test_a_folder_of_several_adapters_names_its_subfolders(tmp_path) -> None:
    model = specpeft.get_adapter_model(_tiny_llama(), method_config("svfit", ["q_proj"]), adapter_name="first")
    model.add_adapter("second", method_config("svfit", ["v_proj"]))
    model.save_pretrained(str(tmp_path / "adapters"))
    assert not os.path.isfile(tmp_path / "adapters" / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="subfolders: first, second; pass one of those"):
        load_saved_adapter(tmp_path / "adapters")


def test_to_lora_at_full_energy_keeps_a_low_rank_delta_at_its_rank(tmp_path) -> None:
    """energy=1.0 counts only components above fp32 rounding: FedSVD r=4 converts at rank 4, exactly."""
    model = specpeft.get_adapter_model(_tiny_llama(), method_config("fedsvd", ["q_proj", "down_proj"]))
    perturb(model, 0.2)
    model.save_pretrained(str(tmp_path / "adapter"))
    report = convert_to_lora(tmp_path / "adapter", tmp_path / "lora", energy=1.0, progress=False)
    assert [layer.rank for layer in report.layers] == [4] * len(report.layers)
    assert report.max_relative_error < 1e-5
