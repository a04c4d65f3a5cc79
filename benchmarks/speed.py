"""Per-layer fwd+bwd time of every specpeft method ÷ the frozen base layer and ÷ its nearest peft method, one run.

    python benchmarks/speed.py            # W 4096×4096 and 4096×11008 (d_out×d_in), T = 1024 tokens
    python benchmarks/speed.py --quick    # W 1024×1024 and 1024×2752, T = 256, 2 repeats

Each variant wraps one nn.Linear(d_in, d_out) (fp32, same seeded weight) in a one-layer model through its library's
public API (`specpeft.get_adapter_model`, `peft.get_peft_model`) and times `model(x).backward(g)` with
`x.requires_grad=True` (a layer inside a network: the frozen base pays for y and dX). Pairings (ours → peft):
SVFit r=8 → LoRA r=8 (and PiSSA r=8: same rank; SVFit trains 8 numbers, so no count match exists);
SoKA default (r_kp = 1) → LoKr with the (decompose_factor, r, decompose_both) of the closest trainable count;
TeRA (default: Δ = P ⊗ M_N, rank-1 last mode) → VeRA r=16 (VeRA's count d_out + r is near its minimum, still
above TeRA's);
FLoRA r=(8, 8) → LoRA r=8 (65,600 vs 65,536 at 4096²); FedSVD r=8 → LoRA r=8 (same factors, A frozen);
SNELLA d=8 → LoRA r=8 (same low-rank dim d). All variants run round-robin inside every repeat, the order rotated
each repeat, so machine noise hits them alike; the table holds medians over `--repeats` after `--warmup` rounds.
CUDA (when present; `--devices cuda` alone) runs bf16 at T ∈ {1024, 4096}, each of ours also forced to the kernel
backend "auto" does not pick there ("[torch]", or "[triton]" for SVFit and SoKA), and times `--cuda-steps` queued
steps between synchronizes.
Results: benchmarks/results/speed{,_quick}{,_cuda}.{md,json,png} (`--stem` names others).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

import specpeft  # noqa: E402


@dataclass
class Variant:
    label: str
    library: str  # "base", "peft" or "specpeft"
    build: Callable[[nn.Linear], nn.Module]
    nearest: str | None = None  # label of the peft variant it is compared with


def _peft(config: Any) -> Callable[[nn.Linear], nn.Module]:
    import peft

    return lambda layer: peft.get_peft_model(_harness.OneLayer(layer), config)


def _ours(config: Any) -> Callable[[nn.Linear], nn.Module]:
    return lambda layer: specpeft.get_adapter_model(_harness.OneLayer(layer), config)


def variants(d_out: int, d_in: int, soka_count: int, device: str) -> list[Variant]:
    """The base, the peft methods and ours; on CUDA each of ours twice: kernel_backend "auto" and the other backend."""
    import peft

    t = ["lin"]
    lokr = _harness.matched_lokr(d_out, d_in, soka_count)
    lokr_label = f"peft LoKr (factor {lokr['decompose_factor']}, r={lokr['r']}" + (", both)" if lokr["decompose_both"]
                                                                                  else ")")
    ours = [
        ("SVFit r=8", specpeft.SVFitConfig(target_modules=t, r=8, svd=specpeft.SVDInit(kind="randomized")),
         "peft LoRA r=8"),
        ("SoKA r_kp=1 (default)", specpeft.SoKAConfig(target_modules=t), lokr_label),
        ("TeRA default ranks", specpeft.TeRAConfig(target_modules=t), "peft VeRA r=16"),
        ("FLoRA r=(8, 8)", specpeft.FLoRAConfig(target_modules=t, r=8), "peft LoRA r=8"),
        ("FedSVD r=8", specpeft.FedSVDConfig(target_modules=t, r=8), "peft LoRA r=8"),
        ("SNELLA d=8", specpeft.SNELLAConfig(target_modules=t, low_rank_dim=8), "peft LoRA r=8"),
    ]
    if device == "cuda":  # the backend "auto" does not pick, beside the one it does: what the kernels buy here
        ours = [row for label, config, nearest in ours for row in (
            [(label, config, nearest)] + ([_other_backend(label, config, nearest)]
                                          if hasattr(config, "kernel_backend") else []))]
    return [
        Variant("frozen base", "base", lambda layer: _harness.OneLayer(layer).requires_grad_(False)),
        Variant("peft LoRA r=8", "peft", _peft(peft.LoraConfig(target_modules=t, r=8, lora_alpha=16))),
        Variant("peft PiSSA r=8", "peft", _peft(peft.LoraConfig(target_modules=t, r=8, lora_alpha=8,
                                                                 init_lora_weights="pissa_niter_4"))),
        Variant(lokr_label, "peft", _peft(peft.LoKrConfig(target_modules=t, alpha=lokr["r"], **lokr))),
        Variant("peft VeRA r=16", "peft", _peft(peft.VeraConfig(target_modules=t, r=16))),
        *(Variant(label, "specpeft", _ours(config), nearest) for label, config, nearest in ours),
    ]


def _other_backend(label: str, config: Any, nearest: str) -> tuple[str, Any, str]:
    """The config forced to the kernel backend that "auto" does not run on CUDA for this method, labelled by it."""
    backend = "triton" if not specpeft.get_method(config).adapter_cls.triton_by_default else "torch"
    return f"{label} [{backend}]", replace(config, kernel_backend=backend), nearest


def soka_trainable(d_out: int, d_in: int) -> int:
    """SoKA r_kp=1's trainable count for this shape, read from its layer record (no KPSVD: meta weight)."""
    with torch.device("meta"):
        layer = nn.Linear(d_in, d_out)
    model = specpeft.get_adapter_model(_harness.OneLayer(layer), specpeft.SoKAConfig(target_modules=["lin"], r=1))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bench_shape(d_out: int, d_in: int, tokens: int, device: str, repeats: int, warmup: int,
                dtype: torch.dtype = torch.float32, steps: int = 1, methods: list[str] | None = None,
                compile_models: bool = False) -> list[dict]:
    torch.manual_seed(0)
    weight_layer = nn.Linear(d_in, d_out)
    try:
        soka_count = soka_trainable(d_out, d_in)
    except Exception:  # noqa: BLE001 - a meta-device build may be unsupported; build it for real then
        soka_count = sum(p.numel() for p in specpeft.get_adapter_model(
            _harness.OneLayer(_copy(weight_layer)), specpeft.SoKAConfig(target_modules=["lin"], r=1)).parameters()
            if p.requires_grad)
    specs = [v for v in variants(d_out, d_in, soka_count, device)
             if methods is None or v.label == "frozen base" or any(v.label.startswith(m) for m in methods)]
    models, init_s = {}, {}
    for v in specs:
        start = time.perf_counter()
        # as a user would: the base already on its device and dtype, then each library adds its adapter
        models[v.label] = v.build(_copy(weight_layer).to(device, dtype))
        if compile_models:  # compiled on the first (warm-up) step
            models[v.label] = torch.compile(models[v.label])
        init_s[v.label] = time.perf_counter() - start
        print(f"  built {v.label} in {init_s[v.label]:.1f} s", file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen).to(device, dtype).requires_grad_(True)
    grad = torch.randn(tokens, d_out, generator=gen).to(device, dtype)
    med = _harness.interleaved_medians({v.label: models[v.label] for v in specs}, x, grad, repeats, warmup,
                                       progress=True, steps=steps)
    rows = []
    for v in specs:
        rows.append({
            "d_out": d_out, "d_in": d_in, "tokens": tokens, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "method": v.label, "library": v.library, "nearest_peft": v.nearest,
            "trainable": 0 if v.library == "base" else sum(p.numel() for p in models[v.label].parameters()
                                                           if p.requires_grad),
            "ms": 1e3 * med[v.label], "vs_base": med[v.label] / med["frozen base"],
            "vs_peft": med[v.label] / med[v.nearest] if v.nearest in med else None,
            "init_s": init_s[v.label],
        })
    return rows


def _copy(layer: nn.Linear) -> nn.Linear:
    clone = nn.Linear(layer.in_features, layer.out_features)
    clone.load_state_dict(layer.state_dict())
    return clone


def markdown(rows: list[dict], header: dict, args: argparse.Namespace) -> str:
    extra = (f"One nn.Linear per case, fwd+bwd with x.requires_grad (loss = Σ y·g), median of {args.repeats} "
             f"round-robin repeats after {args.warmup} warm-up round(s) (CUDA: each repeat averages "
             f"{args.cuda_steps} steps between synchronizes). ÷ base = variant ÷ frozen base layer; "
             "÷ peft = specpeft method ÷ its nearest peft method (pairing in the script docstring); "
             "[torch] / [triton] = the same config forced to the backend \"auto\" does not pick on CUDA."
             + (" Every variant runs as torch.compile(model) (compiled in the warm-up round)." if args.compile else ""))
    lines = ["# Per-layer speed: specpeft methods vs frozen base and peft", "", _harness.header_markdown(header, extra),
             "| device | dtype | W (d_out×d_in) | T | method | trainable | ms | ÷ base | nearest peft | ÷ peft "
             "| init s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_peft = f"**{r['vs_peft']:.2f}**" if r["vs_peft"] is not None else "—"
        ms = f"{r['ms']:.0f}" if r["ms"] >= 10 else f"{r['ms']:.3g}"
        lines.append(f"| {r['device']} | {r.get('dtype', 'float32')} | {r['d_out']}×{r['d_in']} | {r['tokens']} | "
                     f"{r['method']} | {r['trainable']:,} | {ms} | {r['vs_base']:.2f} | {r['nearest_peft'] or '—'} | "
                     f"{vs_peft} | {r['init_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["device"], r["d_out"], r["d_in"], r["tokens"]) for r in rows}, key=str)
    fig, axes = plt.subplots(1, len(cases), figsize=(7 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        ours = [r for r in rows if (r["device"], r["d_out"], r["d_in"], r["tokens"]) == case
                and r["library"] == "specpeft"]
        xs = range(len(ours))
        ax.bar([i - 0.2 for i in xs], [r["vs_base"] for r in ours], 0.4, label="÷ frozen base")
        ax.bar([i + 0.2 for i in xs], [r["vs_peft"] or float("nan") for r in ours], 0.4,  # nan: pair not run
               label="÷ nearest peft method")
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_yscale("log")  # ratios span 0.5× to 30×
        ax.set_xticks(list(xs), [r["method"] + "\nvs " + r["nearest_peft"].removeprefix("peft ")[:22]
                                 for r in ours], fontsize=7)
        ax.set_ylabel("fwd+bwd time ratio (log; lower is faster)")
        ax.set_title(f"{case[0]}: W {case[1]}×{case[2]}, T = {case[3]}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024-wide layers, T = 256, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; quick 2)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--devices", default=None,
                        help="comma list of cpu, cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--cuda-tokens", default="1024,4096", help="comma list of T on CUDA")
    parser.add_argument("--cuda-dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="base weight and activation dtype on CUDA (CPU runs fp32)")
    parser.add_argument("--cuda-steps", type=int, default=20, help="steps averaged per CUDA timing")
    parser.add_argument("--shapes", default=None, help="comma list of OUTxIN (default 4096x4096,4096x11008)")
    parser.add_argument("--methods", default=None,
                        help="comma list of label prefixes to run (the frozen base always runs), e.g. 'TeRA,peft VeRA'")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model) for every variant")
    parser.add_argument("--stem", default=None, help="results file stem (default speed[_quick][_cuda])")
    parser.add_argument("--out", default=str(_harness.RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    args.repeats = args.repeats or (2 if args.quick else 3)
    header = _harness.run_header("speed", argv)
    wall = time.perf_counter()
    shapes, tokens = ([(1024, 1024), (1024, 2752)], 256) if args.quick else ([(4096, 4096), (4096, 11008)], 1024)
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cuda_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.cuda_dtype]
    rows = []
    for device in devices:
        on_cuda = device == "cuda"
        for d_out, d_in in shapes:
            for T in ([int(t) for t in args.cuda_tokens.split(",")] if on_cuda else [tokens]):
                start = time.perf_counter()
                rows.extend(bench_shape(d_out, d_in, T, device, args.repeats, args.warmup,
                                        dtype=cuda_dtype if on_cuda else torch.float32,
                                        steps=args.cuda_steps if on_cuda else 1,
                                        methods=args.methods.split(",") if args.methods else None,
                                        compile_models=args.compile))
                print(f"[{device} {d_out}×{d_in}, T={T}] {time.perf_counter() - start:.0f} s", file=sys.stderr)
    header["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    header["wall_s"] = time.perf_counter() - wall
    table = markdown(rows, header, args)
    print(table)
    stem = args.stem or ("speed_quick" if args.quick else "speed") + ("_cuda" if devices == ["cuda"] else "")
    out = Path(args.out)
    _harness.write_outputs(out, stem, table, {"header": header, "args": vars(args), "rows": rows})
    plot(rows, out / f"{stem}.png")
    return rows


if __name__ == "__main__":
    main()
