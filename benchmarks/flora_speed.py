"""FLoRA layer speed: fwd+bwd ÷ the frozen base layer and ÷ peft LoRA at (nearly) equal trainable parameters.

    python benchmarks/flora_speed.py              # batch 8 (conv) / 1,024 tokens (linear), 2 threads, wall clock
    python benchmarks/flora_speed.py --threads 1  # one thread timed by process CPU time: steadier on a loaded machine
    python benchmarks/flora_speed.py --quick      # batch 2 / 256 tokens, 3 rounds

Layers (issue 5, anchors/performance.md §2.3): a 3×3 Conv2d 256→256 on 32×32 maps (padding 1) and a 4096×4096
Linear. Every variant wraps the same layer inside a one-layer model and runs through its library's own wrapper:
specpeft's bridge for FLoRA (forward_mode "factored", "materialized" and "auto"), peft's LoRA layer for LoRA
(public `peft.LoraConfig`, rank chosen so its trainable count is the closest to FLoRA's; both counts are printed).
The input requires grad (a layer inside a network), so the frozen base pays for its input gradient too.

Timing: torch.set_num_threads(2) (or --threads); warm-up rounds, then `--repeats` rounds in which every variant
runs once, in turn. A ratio cell is "median over rounds of (variant ÷ frozen base in the same round) / ratio of the
minimum times": the first cancels load drift, the second is the least disturbed estimate (load only adds time).
Columns: fwd+bwd (grad on, loss = Σ y·g) and fwd (inference, no grad).
Results: benchmarks/results/flora_speed{,_quick}{,_1thread}.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import specpeft  # noqa: E402
from specpeft.adapters.flora import FLoRAAdapter  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Setting:
    name: str
    make_layer: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    flora_r: int | list[int]


def lora_count(layer: nn.Module, r: int) -> int:
    """Trainable parameters of peft LoRA at rank r: Linear r(in + out); Conv2d r·in·k_h·k_w (A) + out·r (B)."""
    if isinstance(layer, nn.Conv2d):
        k = layer.kernel_size[0] * layer.kernel_size[1]
        return r * layer.in_channels // layer.groups * k + layer.out_channels * r
    return r * (layer.in_features + layer.out_features)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_variants(setting: Setting) -> tuple[dict[str, nn.Module], dict[str, int], str]:
    torch.manual_seed(0)
    layer = setting.make_layer()
    base = _harness.OneLayer(layer).requires_grad_(False)
    variants: dict[str, nn.Module] = {"frozen base": base}
    counts: dict[str, int] = {}
    for mode in ("factored", "materialized", "auto"):
        config = specpeft.FLoRAConfig(target_modules=["lin"], r=setting.flora_r, forward_mode=mode)
        model = specpeft.get_adapter_model(_harness.OneLayer(copy.deepcopy(layer)), config)
        with torch.no_grad():  # a trained-looking core, so no path can shortcut a zero update
            for name, p in model.named_parameters():
                if name.endswith(".core"):
                    p.normal_(0, 0.01)
        variants[f"FLoRA {mode}"] = model
    counts["FLoRA"] = trainable(variants["FLoRA auto"])
    lora_r = min(range(1, 257), key=lambda r: abs(lora_count(layer, r) - counts["FLoRA"]))
    lora_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["lin"])
    lora = get_peft_model(_harness.OneLayer(copy.deepcopy(layer)), lora_config)
    with torch.no_grad():  # B = 0 at init; make it non-zero like a trained adapter
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    variants[f"peft LoRA r={lora_r}"] = lora
    counts[f"peft LoRA r={lora_r}"] = trainable(lora)
    assert counts[f"peft LoRA r={lora_r}"] == lora_count(layer, lora_r)
    return variants, counts, f"peft LoRA r={lora_r}"


def _base_macs(layer: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-adds of the base layer's forward (stride-1, size-preserving conv or a Linear)."""
    if isinstance(layer, nn.Conv2d):
        batch, _, height, width = shape
        return batch * height * width * layer.weight.numel()
    return shape[0] * layer.weight.numel()


def step_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, train: bool) -> Callable[[], None]:
    if train:
        def run() -> None:
            x.grad = None
            model.zero_grad(set_to_none=True)
            y = model(x)
            y.backward(grad)
    else:
        def run() -> None:
            with torch.no_grad():
                model(x)
    return run


def measure(
    variants: dict[str, nn.Module], shape: tuple[int, ...], warmup: int, repeats: int, clock: Callable[[], float]
) -> dict:
    gen = torch.Generator().manual_seed(1)
    out: dict[str, dict] = {}
    for train in (True, False):
        x = torch.randn(*shape, generator=gen).requires_grad_(train)
        with torch.no_grad():
            grad = torch.randn_like(variants["frozen base"](x))
        runs = {name: step_fn(m.train(train), x, grad, train) for name, m in variants.items()}
        for _ in range(warmup):
            for run in runs.values():
                run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = clock()
                run()
                times[name].append(clock() - start)
        key = "fwd+bwd" if train else "fwd"
        out[key] = {
            name: {
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "ratio_to_base": statistics.median(t / b for t, b in zip(ts, times["frozen base"])),
                "min_ratio_to_base": min(ts) / min(times["frozen base"]),
                "times_s": ts,
            }
            for name, ts in times.items()
        }
    return out


def auto_choice(model: nn.Module, shape: tuple[int, ...], train: bool) -> str:
    adapter = next(m for m in model.modules() if isinstance(m, FLoRAAdapter))
    with torch.set_grad_enabled(train):
        return "factored" if adapter.use_factored(torch.empty(shape, device="meta")) else "materialized"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch, fewer repeats (< 1 min)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; with 1 the clock is this process's CPU time (immune to time slicing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    batch, tokens = (2, 256) if args.quick else (8, 1024)
    settings = [
        Setting("Conv2d 256→256 3×3, 32×32", lambda: nn.Conv2d(256, 256, 3, padding=1), (batch, 256, 32, 32), 16),
        Setting("Conv2d 256→256 3×3, 32×32", lambda: nn.Conv2d(256, 256, 3, padding=1), (batch, 256, 32, 32), 32),
        Setting("Linear 4096×4096", lambda: nn.Linear(4096, 4096), (tokens, 4096), 8),
        Setting("Linear 4096×4096", lambda: nn.Linear(4096, 4096), (tokens, 4096), 16),
    ]
    rows, raw, macs = [], [], []
    started = time.perf_counter()
    for setting in settings:
        variants, counts, lora_name = build_variants(setting)
        result = measure(variants, setting.input_shape, warmup, repeats, clock)
        auto = {k: auto_choice(variants["FLoRA auto"], setting.input_shape, k == "fwd+bwd") for k in result}
        lora = result["fwd+bwd"][lora_name]
        ranks = next(m for m in variants["FLoRA auto"].modules() if isinstance(m, FLoRAAdapter)).ranks
        for name in variants:
            if name == "frozen base":
                continue
            fb, fw = result["fwd+bwd"][name], result["fwd"][name]
            label = name + (f" → {auto['fwd+bwd']} / {auto['fwd']}" if name == "FLoRA auto" else "")
            count = counts.get(name, counts["FLoRA"])
            vs_lora = statistics.median(t / b for t, b in zip(fb["times_s"], lora["times_s"]))
            rows.append(
                f"| {setting.name} | {tuple(setting.input_shape)} | {label} | {ranks if 'FLoRA' in name else '-'} | "
                f"{count:,} | {fb['ratio_to_base']:.2f} / {fb['min_ratio_to_base']:.2f} | "
                f"{vs_lora:.2f} / {fb['min_s'] / lora['min_s']:.2f} | "
                f"{fw['ratio_to_base']:.2f} / {fw['min_ratio_to_base']:.2f} |"
            )
        adapter = next(m for m in variants["FLoRA auto"].modules() if isinstance(m, FLoRAAdapter))
        with torch.no_grad():
            stage_macs, _ = adapter.costs(torch.empty(setting.input_shape, device="meta"))
        base_macs = _base_macs(setting.make_layer(), setting.input_shape)
        macs.append(f"{setting.name} r={ranks}: {100 * stage_macs / base_macs:.2f} %")
        raw.append({"setting": setting.name, "input_shape": setting.input_shape, "flora_ranks": ranks,
                    "factored_fwd_macs": stage_macs, "base_fwd_macs": base_macs,
                    "trainable": counts, "auto_choice": auto, "times": result,
                    "base_median_s": {k: v["frozen base"]["median_s"] for k, v in result.items()}})
        print(f"done: {setting.name} r={setting.flora_r} ({time.perf_counter() - started:.0f} s)", flush=True)
    header = (
        "| layer | input | variant | FLoRA ranks | trainable | fwd+bwd ÷ frozen base | fwd+bwd ÷ peft LoRA | "
        "fwd ÷ frozen base |\n|---|---|---|---|---|---|---|---|"
    )
    note = (
        "Each ratio cell: median over rounds of the per-round ratio / ratio of the minimum times. "
        f"Frozen-base medians (s): " + "; ".join(
            f"{r['setting']} {r['input_shape'][0]}: fwd+bwd {r['base_median_s']['fwd+bwd']:.4f}, "
            f"fwd {r['base_median_s']['fwd']:.4f}" for r in raw)
        + ". FLoRA factored forward multiply-adds ÷ the base layer's: " + "; ".join(macs) + "."
    )
    meta = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, {'process CPU' if args.threads == 1 else 'wall'} clock, "
            f"{repeats} rounds")
    table = "\n".join([f"FLoRA speed ({'quick' if args.quick else 'full'}; {meta})", "", header, *rows, "", note])
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = ("flora_speed_quick" if args.quick else "flora_speed") + ("_1thread" if args.threads == 1 else "")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": raw}, indent=1))
    print(f"wrote {RESULTS / stem}.{{md,json}} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
