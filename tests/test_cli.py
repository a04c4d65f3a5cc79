"""The `specpeft` command: every verb in-process through `main([...])`, once through a subprocess, and every failure
case of the safety contract (a one-line error naming the file/key; `--out` absent; `--base` byte-identical)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from adapter_matrix import _tiny_gpt2, _tiny_llama
from specpeft.cli import main
from test_merge import _auto, digest, ids, logits, method_config, save_tiny, train_and_save

TARGETS = ["q_proj", "down_proj"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A sharded tiny Llama, an SVFit adapter on it, and adapters that do not fit it."""
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny(_tiny_llama, str(root / "base"), shard="20KB")
    model = train_and_save(_auto(base), method_config("svfit", TARGETS), str(root / "adapter"))
    torch.save(logits(model, ids()), root / "expected.pt")
    gpt2 = save_tiny(_tiny_gpt2, str(root / "gpt2"))
    train_and_save(_auto(gpt2), method_config("svfit", ["c_attn"]), str(root / "gpt2_adapter"))
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    train_and_save(wide, method_config("svfit", TARGETS), str(root / "wide_adapter"))
    broken = str(root / "nan_adapter")  # a diverged run: NaN in one trainable of the last layer
    shutil.copytree(str(root / "adapter"), broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(broken, "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.1.mlp.down_proj.svfit_adapter.s"][0] = float("nan")
    save_file(tensors, os.path.join(broken, "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"root": str(root), "base": base, "adapter": str(root / "adapter"), "expected": str(root / "expected.pt"),
            "gpt2_adapter": str(root / "gpt2_adapter"), "wide_adapter": str(root / "wide_adapter"), "nan": broken}


def test_help_on_every_verb(capsys) -> None:
    for argv, flags in (([], ["merge", "to-lora", "inspect"]), (["merge"], ["--base", "--dtype", "--overwrite"]),
                        (["to-lora"], ["--rank", "--energy", "--base"]), (["inspect"], ["--plot", "--json"])):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), text


def test_verbs_in_process(files: dict[str, str], tmp_path, capsys) -> None:
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", files["base"], "--adapter", files["adapter"], "--out", out, "--quiet"]) == 0
    assert "merged 4 layers" in capsys.readouterr().out
    torch.testing.assert_close(logits(_auto(out), ids()), torch.load(files["expected"]), atol=1e-4, rtol=1e-4)
    # a non-empty --out is refused, then replaced with --overwrite
    assert main(["merge", "--base", files["base"], "--adapter", files["adapter"], "--out", out, "--quiet"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    open(os.path.join(out, "stale.txt"), "w").close()
    assert main(["merge", "--base", files["base"], "--adapter", files["adapter"], "--out", out, "--quiet",
                 "--dtype", "bf16", "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(out, "stale.txt")) and not glob.glob(str(tmp_path / ".merged.*"))

    lora = str(tmp_path / "lora")
    assert main(["to-lora", "--adapter", files["adapter"], "--out", lora, "--rank", "4", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "max relative error" in text
    with open(os.path.join(lora, "conversion_report.json")) as fh:
        assert len(json.load(fh)["layers"]) == 4

    plot, stats = str(tmp_path / "spectra.png"), str(tmp_path / "stats.json")
    assert main(["inspect", "--adapter", files["adapter"], "--base", files["base"], "--plot", plot, "--json", stats,
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "method:         SVFIT" in text and "‖ΔW‖/‖W‖" in text and os.path.getsize(plot) > 0
    with open(stats) as fh:
        assert [layer["rank"] for layer in json.load(fh)["layers"]] == [4, 4, 4, 4]


def _broken_base(files: dict[str, str], tmp_path, damage: str) -> tuple[str, str]:
    """A copy of the base with one shard damaged; returns (base dir, the damaged file name)."""
    base = str(tmp_path / "base")
    shutil.copytree(files["base"], base)
    with open(os.path.join(base, "model.safetensors.index.json")) as fh:
        shard = json.load(fh)["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    path = os.path.join(base, shard)
    if damage == "missing":
        os.remove(path)
    elif damage == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) - 100)
    else:  # garbage header
        with open(path, "r+b") as fh:
            fh.write(b"\xff" * 16)
    return base, shard


@pytest.mark.parametrize("case", ["missing_shard", "truncated_shard", "garbage_header", "foreign_keys",
                                  "shape_mismatch", "nan_mid_stream", "corrupted_adapter", "out_inside_base",
                                  "to_lora_out_inside_adapter"])
def test_failures_leave_nothing_behind(case: str, files: dict[str, str], tmp_path, capsys) -> None:
    base, adapter, out = files["base"], files["adapter"], str(tmp_path / "out" / "merged")
    expected = {"foreign_keys": "'transformer.h.0.attn.c_attn.weight'",
                "shape_mismatch": "'model.layers.0.mlp.down_proj.weight' has shape (32, 48), but the adapter of "
                                  "layer 'model.layers.0.mlp.down_proj' expects (48, 48)",
                "nan_mid_stream": "NaN or Inf in the merged weight 'model.layers.1.mlp.down_proj.weight'",
                "out_inside_base": "is inside the input", "to_lora_out_inside_adapter": "is inside the input"}.get(case)
    verb = "merge"
    if case in ("missing_shard", "truncated_shard", "garbage_header"):
        base, shard = _broken_base(files, tmp_path, case.split("_")[0])
        expected = shard
    elif case == "foreign_keys":
        adapter = files["gpt2_adapter"]
    elif case == "shape_mismatch":
        adapter = files["wide_adapter"]
    elif case == "nan_mid_stream":
        adapter = files["nan"]
    elif case == "corrupted_adapter":
        adapter = str(tmp_path / "adapter")
        shutil.copytree(files["adapter"], adapter)
        with open(os.path.join(adapter, "adapter_model.safetensors"), "r+b") as fh:
            fh.truncate(200)
        expected = "adapter_model.safetensors"
    elif case == "out_inside_base":
        out = os.path.join(base, "merged")
    else:
        verb, out = "to-lora", os.path.join(adapter, "lora")
    before = {path: digest(path) for path in (base, adapter)}
    argv = ["--adapter", adapter, "--out", out, "--quiet"]
    argv = ["merge", "--base", base, *argv] if verb == "merge" else ["to-lora", *argv, "--rank", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"specpeft {verb}: error:") and expected in err, err
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "out"), "the output (or its parent) was created"
    assert {path: digest(path) for path in (base, adapter)} == before, "an input changed"


def test_console_entry_point_subprocess(files: dict[str, str], tmp_path) -> None:
    out = str(tmp_path / "merged")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "specpeft", "merge", "--base", files["base"], "--adapter", files["adapter"],
               "--out", out, "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merged 4 layers" in result.stdout
    torch.testing.assert_close(logits(_auto(out), ids()), torch.load(files["expected"]), atol=1e-4, rtol=1e-4)


def test_inspect_files_stay_out_of_the_inputs_and_need_overwrite(files: dict[str, str], tmp_path, capsys) -> None:
    """inspect's --json / --plot never land inside --base or --adapter, never replace a file without --overwrite,
    and are written through a temporary file (none is left)."""
    base = str(tmp_path / "base")
    shutil.copytree(files["base"], base)
    before = digest(base)
    argv = ["inspect", "--adapter", files["adapter"], "--base", base, "--quiet"]
    assert main([*argv, "--json", os.path.join(base, "config.json")]) == 1
    assert "is inside the input" in capsys.readouterr().err and digest(base) == before
    stats = tmp_path / "stats.json"
    stats.write_text("kept")
    assert main([*argv, "--json", str(stats)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err and stats.read_text() == "kept"
    assert main([*argv, "--json", str(stats), "--plot", str(tmp_path / "spectra"), "--overwrite"]) == 0
    assert json.loads(stats.read_text())["layers"] and (tmp_path / "spectra.png").stat().st_size > 0  # png by default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "spectra.png", "stats.json"]
    # a plot that fails (an unknown format) leaves the JSON written with it unwritten too
    assert main([*argv, "--json", str(tmp_path / "new.json"), "--plot", str(tmp_path / "spectra.nope")]) == 1
    assert "nope" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "spectra.png", "stats.json"]


@pytest.mark.parametrize("staged", ["directory", "file"])
def test_sigterm_while_staged_leaves_nothing_behind(staged: str, tmp_path) -> None:
    """SIGTERM (kill, a scheduler's time limit) while output is staged unwinds like Ctrl-C: exit status 143, no
    output, no temporary file or directory, no created parent."""
    out = tmp_path / "new" / ("merged" if staged == "directory" else "stats.json")
    enter = f"staged_output({str(out)!r}, False, [])" if staged == "directory" else \
        f"staged_file({str(out)!r}, False, [], '--json')"
    script = (
        "import os, signal\n"
        "from specpeft.merge.output import staged_file, staged_output\n"
        f"with {enter} as staging:\n"
        "    path = os.path.join(staging, 'part') if os.path.isdir(staging) else staging\n"
        "    open(path, 'w').write('half written')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 143, result.stderr[-2000:]
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
