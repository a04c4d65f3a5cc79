"""TeRA on one linear layer: trainable parameters, ΔW rank, and fwd+bwd time ÷ frozen base and ÷ peft VeRA.

    python benchmarks/tera_speed.py            # MiniLM shapes, 1024², 4096², 4096×11008 (≈ 5 min on 2 cores)
    python benchmarks/tera_speed.py --quick    # MiniLM shapes only, fewer repeats (< 1 min)

Each case wraps one `nn.Linear(d_in, d_out)` (`nn.Sequential`, target "0") with the adapter through its public API
(`specpeft.get_adapter_model` / `peft.get_peft_model(VeraConfig)`) and times `out = model(x); out.backward(g)` with
`x.requires_grad=True`, i.e. an inner layer that must also return dX. The frozen base therefore costs 2 GEMMs
(y, dX); any adapter whose ΔW is high-rank needs dΔW = gᵀx, a third GEMM (anchors/performance.md §2.4, Pattern B).
Methods run round-robin within each repeat (side by side on the same noisy CPU); times are medians over repeats and
ratios medians of the per-repeat ratios (`_harness.paired_ratio`).
On an oversubscribed box (load ≫ cores) every op at 2 threads pays a thread rendezvous of tens of ms, which swamps
small ops; `--threads 1` then measures the compute honestly (the table header records the thread count).

VeRA's trainable count is d_out + r ≥ d_out + 1, above TeRA default's Σ J_k + Σ R_k at every shape here, so the
count-matched VeRA is the r whose count is closest: r = max(1, TeRA's count − d_out) (1 at every shape here). r = 16
and peft's default r = 256 are shown too. TeRA N = 2 (the spec's "first ablation": 64-wide modes at 4096, Σ J_k ≈ 8K
trainables) is VeRA-scale; its count-matched VeRA is r = min(d_out, d_in). "TeRA balanced modes" is the layout that
was the default up to session 4 (spec §1.3's balanced modes, one R_k = 1). ΔW rank is
measured (float64 SVD of the fp32 ΔW, fp32 tolerance max(m, n)·eps·σ_max, after setting every trainable vector to
1 + 0.1·N(0, 1)) where min(d_out, d_in) ≤ 512; a full SVD of larger layers takes minutes on this CPU, so those rows say "—".
Results: benchmarks/results/tera_speed{,_quick}.{md,json}.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
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


def tera(rank: int | None, mode: str = "auto", order: int = 3, balanced: bool = False) -> Callable[[int, int], nn.Module]:
    """TeRA through the public API; `balanced` pins the balanced modes of the previous default (one R_k = 1)."""
    def build(d_out: int, d_in: int) -> nn.Module:
        config = specpeft.TeRAConfig(target_modules=["0"], rank=rank, forward_mode=mode, tensor_order=order,
                                     mode_sizes=_harness.balanced_tera_modes([(d_out, d_in)], order) if balanced else {})
        return specpeft.get_adapter_model(_linear(d_out, d_in), config)

    return build


def vera_rank_matched_to_tera(d_out: int, d_in: int) -> int:
    """VeRA trains d_out + r: the r whose count is closest to TeRA default's (r ≥ 1, so ≥ d_out + 1)."""
    count = specpeft.TeRAConfig(target_modules=["0"]).shape_for(d_out, d_in).num_vectors
    return _harness.matched_vera_rank(count, [d_out], min(d_out, d_in))


def vera(rank: int | Callable[[int, int], int] | None) -> Callable[[int, int], nn.Module]:
    """peft VeRA with rank `rank` (an int, or a function of the shape), or min(d_out, d_in) (its largest) for None."""
    from peft import VeraConfig, get_peft_model

    def build(d_out: int, d_in: int) -> nn.Module:
        r = rank(d_out, d_in) if callable(rank) else rank or min(d_out, d_in)
        config = VeraConfig(r=r, target_modules=["0"])
        return get_peft_model(_linear(d_out, d_in), config)

    return build


METHODS = [
    Method("frozen base", frozen_base, "base"),
    Method("TeRA default (Δ = P ⊗ M_N)", tera(None), "tera"),
    Method("TeRA default, factored forced", tera(None, mode="factored"), "tera"),
    Method("TeRA default, merged forced", tera(None, mode="materialized"), "tera"),
    Method("TeRA balanced modes, one R_k = 1", tera(None, balanced=True), "tera"),
    Method("TeRA R=16", tera(16), "tera"),
    Method("TeRA R=4", tera(4), "tera"),
    Method("TeRA R=1", tera(1), "tera"),
    Method("TeRA N=2 default ranks", tera(None, order=2), "tera"),
    Method("peft VeRA r=16", vera(16), "vera"),
    Method("peft VeRA r=256", vera(256), "vera"),
    Method("peft VeRA r=min(out, in)", vera(None), "vera"),
    Method("peft VeRA count-matched", vera(vera_rank_matched_to_tera), "vera"),
]
COMPARABLE_VERA = "peft VeRA r=16"
MATCHED_VERA = "peft VeRA count-matched"


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


def tera_path(model: nn.Module, tokens: int, device_type: str = "cpu") -> str:
    """The path run: "factored" (Δ never formed) or the merged weight W₀ + Δ with the factor gradients of
    Δ = P ⊗ M_N contracted from g and x ("merged+Kronecker grads", R_N = 1), else the vector gradients from the
    dense dΔ = gᵀx ("merged+dΔ") or projected through the frozen factors ("merged+projected")."""
    adapter = next(m for m in model.modules() if isinstance(m, AdapterLayer)).adapters["default"]
    if adapter.use_factored(tokens, device_type):
        return "factored"
    return {"kronecker": "merged+Kronecker grads", "dense": "merged+dΔ"}.get(adapter.grad_plan(tokens),
                                                                             "merged+projected")


def run_case(case: Case, repeats: int, warmup: int, big_repeats: int = 3) -> list[dict]:
    if case.big:
        repeats, warmup = min(repeats, big_repeats), min(warmup, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.tokens, case.d_in, generator=gen).requires_grad_(True)
    grad = torch.randn(case.tokens, case.d_out, generator=gen)
    models = {m.label: m.build(case.d_out, case.d_in) for m in METHODS}
    times = _harness.interleaved_times(models, x, grad, repeats, warmup)
    medians = {label: statistics.median(values) for label, values in times.items()}
    rows = []
    for method in METHODS:
        model = models[method.label]
        rows.append({
            "d_out": case.d_out, "d_in": case.d_in, "tokens": case.tokens, "method": method.label,
            "trainable": _harness.count(p for p in model.parameters() if p.requires_grad),
            "path": tera_path(model, case.tokens) if method.kind == "tera" else "",
            "delta_rank": delta_rank(model, method, case.d_out, case.d_in),
            "ms": 1e3 * medians[method.label], "repeats": repeats,
            "spread_ms": 1e3 * (max(times[method.label]) - min(times[method.label])),
            "times_ms": [1e3 * seconds for seconds in times[method.label]],  # per repeat, for other paired ratios
            **_harness.ratio_columns(times, {"vs_base": (method.label, "frozen base"),
                                             "vs_vera": (method.label, COMPARABLE_VERA),
                                             "vs_matched_vera": (method.label, MATCHED_VERA)}),
            "vera_rank": (vera_rank_matched_to_tera(case.d_out, case.d_in) if method.label == MATCHED_VERA else None),
        })
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"TeRA layer fwd+bwd (x.requires_grad=True), median of {args.repeats} repeats after {args.warmup} warm-up "
        f"(≤ {args.big_repeats} after ≤ 1 for the 4096×4096 T=1024 and 4096×11008 rows), "
        f"{torch.get_num_threads()} threads, fp32, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Ratios, each the "
        "median over repeats of the per-repeat ratio of the two methods' times, with a 95 % bootstrap interval of that "
        f"median in brackets (`_harness.paired_ratio`; none below {_harness.INTERVAL_MIN_ROUNDS} repeats): "
        "÷ frozen base "
        f"(target ≤ {TARGETS['base_ratio']}), ÷ {COMPARABLE_VERA} and ÷ {MATCHED_VERA} (VeRA trains d_out + r: the r "
        f"whose count is closest to TeRA default's, given in the method cell) (target ≤ {TARGETS['vera_ratio']}, i.e. "
        "throughput ≥ VeRA's).",
        "",
        "| layer (out×in) | T | method | trainable | ΔW rank | TeRA path | ms | ÷ base | ÷ VeRA r=16 | ÷ VeRA matched |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rank = "—" if r["delta_rank"] is None else str(r["delta_rank"])
        if r["method"] == "frozen base":
            rank = "(0)"
        method = r["method"] + (f" (r={r['vera_rank']})" if r.get("vera_rank") else "")
        lines.append(
            f"| {r['d_out']}×{r['d_in']} | {r['tokens']} | {method} | {r['trainable']:,} | {rank} | "
            f"{r['path'] or '—'} | {r['ms']:.1f} | "
            + _harness.ratio_cells(r, ("vs_base", "vs_vera", "vs_matched_vera")) + " |"
        )
    lines += [
        "",
        "Notes. (1) Floor of every merged path: the frozen base runs 2 GEMMs (y, dX); TeRA runs both on W₀ + Δ "
        "(built in forward, rebuilt in backward, never saved) and needs the vector gradients on top. "
        "\"merged+dΔ\" forms dΔ = gᵀx (a third GEMM: ≥ 1.5×) and contracts it with the factors (2·m·n·R MACs); "
        "\"merged+projected\" never forms dΔ but contracts g and x through the frozen factors, 2·T·m·n·R_k/n_k MACs "
        "(+ T·n·m_k·R_k terms): cheaper than one GEMM only when R_k < n_k/2, i.e. not at R = 16 on every mode with "
        "16-wide modes (4096 = 16·16·16), where both paths cost ≥ 1 GEMM. With one rank-1 mode Δ = P ⊗ M_k and the "
        "factored path contracts x with M_k and P without forming Δ. The default puts it last, sized by "
        "`init.tucker.wide_last_mode` (the cheapest full-rank split that keeps the trainables under rank(Δ)): at 4096² "
        "modes (16, 8, 32)², 32·4096 + 128·4096 MACs per token per pass (3 passes: y, dX, factor gradients), about "
        "1/26 of a GEMM, run by `kernels.kronecker_linear` (the SoKA op); balanced modes (16, 16, 16)² pay "
        "16·4096 + 256·4096, 1/15 of a GEMM. "
        "With R_N = 1 the merged path instead contracts g and x with M_N and P for the gradients of (P, M_N) "
        "(`kernels.kronecker_merged_linear`: no dΔ, about two factored passes' MACs) on top of the two GEMMs on "
        "W₀ + Δ; the "
        "\"factored forced\" / \"merged forced\" rows time both paths of the default layout, the evidence for the "
        "auto choice. "
        "(2) R = 1 makes ΔW one Kronecker product (∏ min(m_k, n_k) = full rank, the cheap factored chain); its "
        "condition number (≈ 2·10⁵ at 384²) puts a few singular values under the fp32 tolerance, so the measured "
        "numerical rank reads 379; built in float64 it is 384 (tests/test_tera.py checks rank = ∏ min(m_k, n_k) at "
        "R = 1 in float64). (3) \"TeRA path\" is the path run (the auto choice of "
        "specpeft.adapters.tera.TeRAAdapter.use_factored / grad_plan for that token count, unless forced).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM shapes only, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--big-repeats", type=int, default=3,
                        help="repeats of the 4096×4096 T=1024 and 4096×11008 cases (each round ~10-30 s here)")
    parser.add_argument("--only-big", action="store_true", help="run only those two LLM-sized cases")
    parser.add_argument("--stem", default=None, help="results file stem (default tera_speed or tera_speed_quick)")
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
        args.repeats = args.repeats or 9
    if args.only_big:
        cases = [case for case in cases if case.big]
    rows = []
    for case in cases:
        start = time.perf_counter()
        rows.extend(run_case(case, args.repeats, args.warmup, args.big_repeats))
        print(f"[{case.d_out}×{case.d_in}, T={case.tokens}] {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = markdown(rows, args)
    print(table)
    stem = args.stem or ("tera_speed_quick" if args.quick else "tera_speed")
    _harness.write_outputs(_harness.RESULTS, stem, table, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
