"""Forward+backward time of a SoKA layer ÷ the frozen base layer and ÷ peft LoKr at the same trainable-parameter count.

    python benchmarks/soka_speed.py            # W 4096×4096 and 4096×11008 (d_out×d_in), T = 1024, r_kp ∈ {1 (default), 2, 4}
    python benchmarks/soka_speed.py --quick    # W 1024×1024 and 1024×2752, T = 256

Each layer is one nn.Linear (fp32, CPU, 2 threads) whose input requires grad, as inside a network: the frozen base
costs the forward GEMM and the input-gradient GEMM; adapters add their own forward and backward. SoKA goes through
`specpeft.get_adapter_model` (the factored reshape-identity forward over 2·r_kp stacked components, spec §2.6, in
token chunks with a hand-written backward; FLOP floor = 1 + its fwd+bwd MACs ÷ the base's 2·d_out·d_in); peft
LoKr through `peft.get_peft_model(LoKrConfig)`, which builds the dense kron(w1, w2) each step. The LoKr config
(decompose_factor, r, decompose_both) is the one whose trainable count is closest to SoKA's. Variants run
interleaved, repeat after repeat, so machine noise hits all of them alike; the table holds medians.
Targets (issue 3): SoKA ≤ 1.25× base and faster than LoKr.
Results: benchmarks/results/soka_speed{,_quick}{,_t<threads>}.{md,json} (no thread suffix for the default 2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import peft  # noqa: E402

import specpeft  # noqa: E402
from specpeft import SoKAConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_VS_BASE = 1.25


def soka_step_macs(a_shape: tuple[int, int], b_shape: tuple[int, int], r: int) -> int:
    """MACs per token of SoKA's fwd+bwd (`KroneckerDeltaFunction`), in the cheaper contraction order.

    B first: forward X Qᵀ and P Z over the 2r stacked components (n1·n2·m2 + m1·n1·m2 each); backward D = Pᵀ G and
    dX = D Q over 2r, dB = (UᵀG)ᵀ X, Z₁ = X Bᵀ (recomputed) and dA = Σ G Z₁ᵀ over r:
    r·(6·n1·n2·m2 + 5·m1·n1·m2). A first is the mirror image. The frozen A⁰⊗B⁰ half gets no factor gradient.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    return r * min(6 * n1 * n2 * m2 + 5 * m1 * n1 * m2, 6 * m1 * n1 * n2 + 5 * m1 * m2 * n2)


def fwd_bwd(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of one step."""
    x.grad = None
    start = time.perf_counter()
    y = model(x)
    mid = time.perf_counter()
    y.backward(grad)
    return mid - start, time.perf_counter() - start


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bench_shape(d_out: int, d_in: int, tokens: int, ranks: list[int], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    base_layer = nn.Linear(d_in, d_out).requires_grad_(False)
    x = torch.randn(tokens, d_in, requires_grad=True)
    grad = torch.randn(tokens, d_out)
    variants: dict[str, nn.Module] = {"base": _harness.OneLayer(base_layer)}
    meta: dict[str, dict] = {}
    for r in ranks:
        start = time.perf_counter()
        soka = specpeft.get_adapter_model(_harness.OneLayer(base_layer), SoKAConfig(target_modules=["lin"], r=r))
        init_s = time.perf_counter() - start
        record = next(iter(soka.peft_config["default"].layer_records.values()))
        lokr_cfg = _harness.matched_lokr(d_out, d_in, trainable(soka))
        lokr = peft.get_peft_model(_harness.OneLayer(base_layer), peft.LoKrConfig(target_modules=["lin"], **lokr_cfg))
        variants[f"soka{r}"], variants[f"lokr{r}"] = soka, lokr
        meta[f"soka{r}"] = {"params": trainable(soka), "init_s": init_s, "factors": [record["a_shape"], record["b_shape"]]}
        meta[f"lokr{r}"] = {"params": trainable(lokr), "config": lokr_cfg}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in variants}
    for rep in range(repeats + 1):  # the first round is warm-up
        for name, model in variants.items():
            f, fb = fwd_bwd(model, x, grad)
            if rep:
                times[name][0].append(f)
                times[name][1].append(fb)
    med = {name: (statistics.median(f), statistics.median(fb)) for name, (f, fb) in times.items()}
    rows = []
    for r in ranks:
        s, lk = f"soka{r}", f"lokr{r}"
        (a1, n1), (a2, n2) = meta[s]["factors"]
        adapter_macs = soka_step_macs((a1, n1), (a2, n2), r)
        rows.append({
            "shape": [d_out, d_in], "tokens": tokens, "r_kp": r, "soka_params": meta[s]["params"],
            "lokr_params": meta[lk]["params"], "lokr_config": meta[lk]["config"], "factors": meta[s]["factors"],
            "soka_init_s": meta[s]["init_s"],
            "base_fb_ms": 1e3 * med["base"][1], "soka_fb_ms": 1e3 * med[s][1], "lokr_fb_ms": 1e3 * med[lk][1],
            "base_f_ms": 1e3 * med["base"][0], "soka_f_ms": 1e3 * med[s][0], "lokr_f_ms": 1e3 * med[lk][0],
            "soka_vs_base": med[s][1] / med["base"][1], "lokr_vs_base": med[lk][1] / med["base"][1],
            "soka_vs_lokr": med[s][1] / med[lk][1], "soka_fwd_vs_base": med[s][0] / med["base"][0],
            "flop_floor_vs_base": 1 + adapter_macs / (2 * d_out * d_in),
            "raw_ms": {name: [1e3 * t for t in times[name][1]] for name in ("base", s, lk)},
        })
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    load = ", ".join(f"{v:.1f}" for v in args.loadavg)
    head = (f"SoKA speed, CPU fp32, {torch.get_num_threads()} threads, T = {rows[0]['tokens']}, median of {args.repeats} "
            f"interleaved repeats; torch {torch.__version__}, peft {peft.__version__}, {platform.processor() or 'cpu'}, "
            f"{os.cpu_count()} cores, load average at start {load}\n\n"
            "| W (d_out×d_in) | r_kp | factors A⊗B | params SoKA / LoKr | LoKr config (factor, r, both) | base fwd+bwd ms | "
            "SoKA ms | LoKr ms | **SoKA ÷ base** | LoKr ÷ base | **SoKA ÷ LoKr** | SoKA fwd ÷ base fwd | FLOP floor | "
            "SoKA init s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        c = r["lokr_config"]
        ok = "✓" if r["soka_vs_base"] <= TARGET_VS_BASE else "✗"
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['r_kp']} | {tuple(r['factors'][0])}⊗{tuple(r['factors'][1])} | "
            f"{r['soka_params']:,} / {r['lokr_params']:,} | ({c['decompose_factor']}, {c['r']}, {c['decompose_both']}) | "
            f"{r['base_fb_ms']:.0f} | {r['soka_fb_ms']:.0f} | {r['lokr_fb_ms']:.0f} | **{r['soka_vs_base']:.3f}** {ok} | "
            f"{r['lokr_vs_base']:.3f} | **{r['soka_vs_lokr']:.3f}** | {r['soka_fwd_vs_base']:.3f} | "
            f"{r['flop_floor_vs_base']:.3f} | {r['soka_init_s']:.1f} |"
        )
    return head + "\n".join(lines) + f"\n\nTargets: SoKA ÷ base ≤ {TARGET_VS_BASE}, SoKA ÷ LoKr < 1.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1024-sized layers, T = 256 (under a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 5)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="SoKA components r_kp (1: default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or 5
    args.loadavg = list(os.getloadavg())  # the box is shared: ratios, not absolute times, are comparable
    shapes, tokens = ([(1024, 1024), (1024, 2752)], 256) if args.quick else ([(4096, 4096), (4096, 11008)], 1024)
    rows = []
    for d_out, d_in in shapes:
        print(f"[{d_out}×{d_in}] ...", flush=True)
        rows += bench_shape(d_out, d_in, tokens, args.ranks, args.repeats)
    table = markdown(rows, args)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = ("soka_speed_quick" if args.quick else "soka_speed") + ("" if args.threads == 2 else f"_t{args.threads}")
    (RESULTS / f"{stem}.md").write_text(table)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
