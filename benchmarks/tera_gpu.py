"""TeRA on CUDA: one linear layer's training step per path, ÷ frozen base and ÷ peft VeRA r=16, with host time.

    python benchmarks/tera_gpu.py              # bf16, W 1024², 4096², 4096×11008, 11008×4096; T = 1024, 4096, 16384
    python benchmarks/tera_gpu.py --quick      # 4096×11008 only, T = 4096

Builds as `tera_speed.py` does (one nn.Linear, the base on the GPU in bf16 before the adapter is added) and times
`model(x).backward(g)` with x.requires_grad, `--steps` steps queued between two synchronizes, variants round-robin,
median over `--repeats`. "host ms" is the time to queue one step without synchronizing: when it exceeds the step time
of the frozen base plus the adapter's kernels, the layer is host-bound (the GPU waits for Python and the launches).
Variants: the frozen base; peft VeRA r=16; TeRA default as "auto" runs it on CUDA (the torch path, factored from
`init.tucker_cost.CUDA_FACTORED_TOKENS` tokens, merged below), each of its two paths forced ("factored": Δ never
formed; "merged": one GEMM on W + P ⊗ M_N, factor gradients contracted from dY and x), and the Triton kernels "auto"
does not pick (`triton_by_default = False`). CUDA only. Results: benchmarks/results/tera_gpu{,_quick}.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import tera_speed  # noqa: E402

import specpeft  # noqa: E402


def _base(d_out: int, d_in: int) -> nn.Linear:
    """The seeded layer, on the GPU in bf16 before any adapter is added (as a user would)."""
    return tera_speed._linear(d_out, d_in).to("cuda", torch.bfloat16)


def _tera(**options) -> Callable[[int, int], nn.Module]:
    return lambda d_out, d_in: specpeft.get_adapter_model(_base(d_out, d_in),
                                                          specpeft.TeRAConfig(target_modules=["0"], **options))


def _vera(rank: int) -> Callable[[int, int], nn.Module]:
    from peft import VeraConfig, get_peft_model

    return lambda d_out, d_in: get_peft_model(_base(d_out, d_in), VeraConfig(r=rank, target_modules=["0"]))


VARIANTS: dict[str, Callable[[int, int], nn.Module]] = {
    "frozen base": lambda d_out, d_in: _base(d_out, d_in).requires_grad_(False),
    "peft VeRA r=16": _vera(16),
    "TeRA default": _tera(),
    "TeRA factored forced": _tera(forward_mode="factored"),
    "TeRA merged forced": _tera(forward_mode="materialized"),
    "TeRA [triton]": _tera(kernel_backend="triton"),
}


def host_seconds(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, steps: int = 10) -> float:
    """Seconds to queue one step (no synchronize inside): the host's share of the step."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(grad)
    elapsed = (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    return elapsed


def run_case(d_out: int, d_in: int, tokens: int, repeats: int, steps: int) -> list[dict]:
    models = {label: build(d_out, d_in) for label, build in VARIANTS.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen).to("cuda", torch.bfloat16).requires_grad_(True)
    grad = torch.randn(tokens, d_out, generator=gen).to("cuda", torch.bfloat16)
    times = _harness.interleaved_times(models, x, grad, repeats, warmup=2, steps=steps)
    medians = {label: statistics.median(values) for label, values in times.items()}
    rows = []
    for label, model in models.items():
        host = min(host_seconds(model, x, grad) for _ in range(3))
        path = tera_speed.tera_path(model, tokens, "cuda") if label.startswith("TeRA") and "[" not in label else ""
        rows.append({"d_out": d_out, "d_in": d_in, "tokens": tokens, "variant": label, "path": path,
                     "trainable": _harness.count(p for p in model.parameters() if p.requires_grad),
                     "ms": 1e3 * medians[label], "host_ms": 1e3 * host,
                     "vs_base": medians[label] / medians["frozen base"],
                     "vs_vera": medians[label] / medians["peft VeRA r=16"]})
        print(f"{d_out}×{d_in} T={tokens:5d} {label:24s} {rows[-1]['ms']:7.3f} ms  host {rows[-1]['host_ms']:6.3f}  "
              f"÷ base {rows[-1]['vs_base']:5.2f}  ÷ VeRA {rows[-1]['vs_vera']:5.2f}  {path}", file=sys.stderr)
    return rows


def markdown(rows: list[dict], header: dict, args: argparse.Namespace) -> str:
    lines = [
        "# TeRA on CUDA: training step of one layer by path", "",
        _harness.header_markdown(header, f"bf16, fwd+bwd with x.requires_grad, {args.steps} steps queued between "
                                 f"synchronizes, median of {args.repeats} round-robin repeats after 2 warm-up. "
                                 "host ms = time to queue one step without synchronizing."),
        "| W (out×in) | T | variant | TeRA path | trainable | ms | host ms | ÷ base | ÷ VeRA r=16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['d_out']}×{r['d_in']} | {r['tokens']} | {r['variant']} | {r['path'] or '—'} | "
              f"{r['trainable']:,} | {r['ms']:.3f} | {r['host_ms']:.3f} | {r['vs_base']:.2f} | {r['vs_vera']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4096×11008 at T = 4096 only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps queued between synchronizes per timing")
    parser.add_argument("--stem", default=None, help="results file stem (default tera_gpu[_quick])")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tera_gpu.py: needs a CUDA device (CPU timings: benchmarks/tera_speed.py).")
    warnings.filterwarnings("ignore")
    header = _harness.run_header("tera_gpu", None)
    shapes = [(4096, 11008)] if args.quick else [(1024, 1024), (4096, 4096), (4096, 11008), (11008, 4096)]
    tokens = [4096] if args.quick else [1024, 4096, 16384]
    start = time.perf_counter()
    rows = [row for d_out, d_in in shapes for t in tokens for row in run_case(d_out, d_in, t, args.repeats,
                                                                               args.steps)]
    header["wall_s"] = time.perf_counter() - start
    table = markdown(rows, header, args)
    print(table)
    out = Path(args.out) if args.out else _harness.RESULTS
    _harness.write_outputs(out, args.stem or ("tera_gpu_quick" if args.quick else "tera_gpu"), table,
                           {"header": header, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
