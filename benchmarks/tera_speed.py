"""TeRA on one linear layer: trainable parameters, ΔW rank, and fwd+bwd time ÷ frozen base and ÷ peft VeRA.

    python benchmarks/tera_speed.py            # MiniLM shapes, 1024², 4096², 4096×11008 (≈ 5 min on 2 cores)
    python benchmarks/tera_speed.py --quick    # MiniLM shapes only, fewer repeats (< 1 min)

Each case wraps one `nn.Linear(d_in, d_out)` (`nn.Sequential`, target "0") with the adapter through its public API
(`specpeft.get_adapter_model` / `peft.get_peft_model(VeraConfig)`) and times `out = model(x); out.backward(g)` with
`x.requires_grad=True`, i.e. an inner layer that must also return dX. The frozen base therefore costs 2 GEMMs
(y, dX); any adapter whose ΔW is high-rank needs dΔW = gᵀx, a third GEMM (anchors/performance.md §2.4, Pattern B).
Methods run round-robin within each repeat (side by side on the same noisy CPU); the median over repeats is kept.
On an oversubscribed box (load ≫ cores) every op at 2 threads pays a thread rendezvous of tens of ms, which swamps
small ops; `--threads 1` then measures the compute honestly (the table header records the thread count).

VeRA's trainable count is d_out + r ≥ d_out, far above TeRA's Σ J_k + Σ R_k, so "comparable" VeRA is the closest it
can get: r = 16 (d_out + 16). peft's default r = 256 is shown too. TeRA N = 2 (the spec's "first ablation": 64-wide
modes at 4096, Σ J_k ≈ 8K trainables) is VeRA-scale; its count-matched VeRA is r = min(d_out, d_in). ΔW rank is
measured (float64 SVD of the fp32 ΔW, fp32 tolerance max(m, n)·eps·σ_max, after setting every trainable vector to
1 + 0.1·N(0, 1)) where min(d_out, d_in) ≤ 512; a full SVD of larger layers takes minutes on this CPU, so those rows say "—".
Results: benchmarks/results/tera_speed{,_quick}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specpeft  # noqa: E402
from specpeft.adapters.bridge import AdapterLayer  # noqa: E402

RANK_LIMIT = 512  # measure rank(ΔW) only where min(d_out, d_in) ≤ this
TARGETS = {"base_ratio": 1.25, "vera_ratio": 1.0}


@dataclass
class Case:
    d_out: int
    d_in: int
    tokens: int
    big: bool = False  # LLM-sized: fewer repeats (each round runs every method once, ~10-30 s here)


@dataclass
class Method:
    label: str
    build: Callable[[int, int], nn.Module]
    kind: str  # "base", "tera" or "vera"


def _linear(d_out: int, d_in: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out))


def frozen_base(d_out: int, d_in: int) -> nn.Module:
    return _linear(d_out, d_in).requires_grad_(False)


def tera(rank: int | None, mode: str = "auto", order: int = 3) -> Callable[[int, int], nn.Module]:
    config = specpeft.TeRAConfig(target_modules=["0"], rank=rank, forward_mode=mode, tensor_order=order)
    return lambda d_out, d_in: specpeft.get_adapter_model(_linear(d_out, d_in), config)


def vera(rank: int | None) -> Callable[[int, int], nn.Module]:
    """peft VeRA with rank `rank`, or min(d_out, d_in) (its largest useful rank) for None."""
    from peft import VeraConfig, get_peft_model

    def build(d_out: int, d_in: int) -> nn.Module:
        config = VeraConfig(r=rank or min(d_out, d_in), target_modules=["0"])
        return get_peft_model(_linear(d_out, d_in), config)

    return build


METHODS = [
    Method("frozen base", frozen_base, "base"),
    Method("TeRA default (one R_k = 1, others 16)", tera(None), "tera"),
    Method("TeRA R=16", tera(16), "tera"),
    Method("TeRA R=4", tera(4), "tera"),
    Method("TeRA R=1", tera(1), "tera"),
    Method("TeRA N=2 default ranks", tera(None, order=2), "tera"),
    Method("peft VeRA r=16", vera(16), "vera"),
    Method("peft VeRA r=256", vera(256), "vera"),
    Method("peft VeRA r=min(out, in)", vera(None), "vera"),
]
COMPARABLE_VERA = "peft VeRA r=16"


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_RANKS: dict[tuple[str, int, int], int | None] = {}


def delta_rank(model: nn.Module, method: Method, d_out: int, d_in: int) -> int | None:
    """rank(ΔW) in float64 after giving every trainable vector a generic (non-init) value (cached per shape)."""
    key = (method.label, d_out, d_in)
    if key not in _RANKS:
        _RANKS[key] = _measure_rank(model, method.kind, d_out, d_in)
    return _RANKS[key]


def _measure_rank(model: nn.Module, kind: str, d_out: int, d_in: int) -> int | None:
    if kind == "base" or min(d_out, d_in) > RANK_LIMIT:
        return None
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    layer = next(m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer"))
    delta = layer.get_delta_weight("default")
    # ΔW is computed in fp32: count singular values above fp32 rounding (float64 SVD, fp32 tolerance).
    tolerance = max(d_out, d_in) * torch.finfo(delta.dtype).eps
    return int(torch.linalg.matrix_rank(delta.double(), rtol=tolerance).item())


def tera_path(model: nn.Module, tokens: int) -> str:
    """The auto choice: "factored" (Δ never formed) or the merged weight W₀ + Δ with the vector gradients from
    the dense dΔ = gᵀx ("merged+dΔ") or projected through the frozen factors ("merged+projected")."""
    adapter = next(m for m in model.modules() if isinstance(m, AdapterLayer)).adapters["default"]
    if adapter.use_factored(tokens):
        return "factored"
    return "merged+dΔ" if adapter.grad_plan(tokens) == "dense" else "merged+projected"


def time_fwd_bwd(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    model(x).backward(grad)
    return time.perf_counter() - start


def run_case(case: Case, repeats: int, warmup: int) -> list[dict]:
    if case.big:
        repeats, warmup = min(repeats, 3), min(warmup, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.tokens, case.d_in, generator=gen).requires_grad_(True)
    grad = torch.randn(case.tokens, case.d_out, generator=gen)
    models = {m.label: m.build(case.d_out, case.d_in) for m in METHODS}
    times: dict[str, list[float]] = {label: [] for label in models}
    for step in range(warmup + repeats):
        order = METHODS[step % len(METHODS):] + METHODS[: step % len(METHODS)]  # rotate: no fixed position bias
        for method in order:
            elapsed = time_fwd_bwd(models[method.label], x, grad)
            if step >= warmup:
                times[method.label].append(elapsed)
    medians = {label: statistics.median(values) for label, values in times.items()}
    rows = []
    for method in METHODS:
        model = models[method.label]
        rows.append({
            "d_out": case.d_out, "d_in": case.d_in, "tokens": case.tokens, "method": method.label,
            "trainable": trainable(model) if method.kind != "base" else 0,
            "path": tera_path(model, case.tokens) if method.kind == "tera" else "",
            "delta_rank": delta_rank(model, method, case.d_out, case.d_in),
            "ms": 1e3 * medians[method.label], "repeats": repeats,
            "spread_ms": 1e3 * (max(times[method.label]) - min(times[method.label])),
            "vs_base": medians[method.label] / medians["frozen base"],
            "vs_vera": medians[method.label] / medians[COMPARABLE_VERA],
        })
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"TeRA layer fwd+bwd (x.requires_grad=True), median of {args.repeats} repeats after {args.warmup} warm-up "
        f"(≤ 3 after ≤ 1 for the 4096×4096 T=1024 and 4096×11008 rows), "
        f"{torch.get_num_threads()} threads, fp32, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Ratios: ÷ frozen base "
        f"(target ≤ {TARGETS['base_ratio']}) and ÷ {COMPARABLE_VERA} (closest VeRA trainable count; target ≤ "
        f"{TARGETS['vera_ratio']}, i.e. throughput ≥ VeRA's).",
        "",
        "| layer (out×in) | T | method | trainable | ΔW rank | TeRA path | ms | ÷ base | ÷ VeRA r=16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rank = "—" if r["delta_rank"] is None else str(r["delta_rank"])
        if r["method"] == "frozen base":
            rank = "(0)"
        lines.append(
            f"| {r['d_out']}×{r['d_in']} | {r['tokens']} | {r['method']} | {r['trainable']:,} | {rank} | "
            f"{r['path'] or '—'} | {r['ms']:.1f} | {r['vs_base']:.2f} | {r['vs_vera']:.2f} |"
        )
    lines += [
        "",
        "Notes. (1) Floor of every merged path: the frozen base runs 2 GEMMs (y, dX); TeRA runs both on W₀ + Δ "
        "(built in forward, rebuilt in backward, never saved) and needs the vector gradients on top. "
        "\"merged+dΔ\" forms dΔ = gᵀx (a third GEMM: ≥ 1.5×) and contracts it with the factors (2·m·n·R MACs); "
        "\"merged+projected\" never forms dΔ but contracts g and x through the frozen factors, 2·T·m·n·R_k/n_k MACs "
        "(+ T·n·m_k·R_k terms): cheaper than one GEMM only when R_k < n_k/2, i.e. not at R = 16 on every mode with "
        "16-wide modes (4096 = 16·16·16), where both paths cost ≥ 1 GEMM. The default gives one mode R_k = 1 "
        "(`init.tucker.cheap_mode_ranks`): Δ = P ⊗ M_k, so the factored path contracts x with M_k and P at "
        "n·m_k + (n/n_k)·m MACs per token per pass (3 passes: y, dX, dP), about 1/16 of a GEMM at 4096². "
        "(2) R = 1 makes ΔW one Kronecker product (∏ min(m_k, n_k) = full rank, the cheap factored chain); its "
        "condition number (≈ 2·10⁵ at 384²) puts a few singular values under the fp32 tolerance, so the measured "
        "numerical rank reads 379; built in float64 it is 384 (tests/test_tera.py checks rank = ∏ min(m_k, n_k) at "
        "R = 1 in float64). (3) \"TeRA path\" is the auto choice (specpeft.adapters.tera.TeRAAdapter.use_factored / "
        "grad_plan) for that token count.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM shapes only, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (2 = the box's cores; 1 when it is oversubscribed, see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.quick:
        cases = [Case(384, 384, 512), Case(1536, 384, 512), Case(384, 384, 8)]
        args.repeats = args.repeats or 5
    else:
        cases = [Case(384, 384, 2048), Case(1536, 384, 2048), Case(384, 1536, 2048), Case(384, 384, 8),
                 Case(1024, 1024, 1024), Case(4096, 4096, 8), Case(4096, 4096, 1024, big=True),
                 Case(4096, 11008, 1024, big=True)]
        args.repeats = args.repeats or 5
    rows = []
    for case in cases:
        start = time.perf_counter()
        rows.extend(run_case(case, args.repeats, args.warmup))
        print(f"[{case.d_out}×{case.d_in}, T={case.tokens}] {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = markdown(rows, args)
    print(table)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stem = "tera_speed_quick" if args.quick else "tera_speed"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
