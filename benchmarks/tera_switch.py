"""Where TeRA's default layout should switch from the factored to the merged path on CPU: chains of adapted layers.

    python benchmarks/tera_switch.py            # MiniLM's three shapes and 1024², T ≤ 1024 (≈ 1 min on 2 cores)
    python benchmarks/tera_switch.py --big      # + 4096², T = 512-2048 (≈ 2 min more)

TeRA applies Δ = P ⊗ M_N to x without forming it (factored, `kernels.kronecker_linear`) for few tokens a call and
merges it into the base weight with Kronecker factor gradients (`kernels.kronecker_merged_linear`) for many; the token
count where it switches comes from `init.tucker_cost.training_step_costs`, whose factored estimate is scaled by
`KRONECKER_APPLY_PENALTY`. This script measures the switch the way a model runs it: a chain of layers of one shape
(a non-square layer alternates with a frozen partner that maps back to its input width) under one backward, timed
frozen / all factored / all merged round-robin, and reports merged ÷ factored per token count (the median over rounds
of the per-round ratio, with a 95 % bootstrap interval: `_harness.paired_ratio`) beside the first token count the
cost model merges at, with and without the penalty. Results: benchmarks/results/tera_switch.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
from specpeft import LayerGeometry, TeRAConfig  # noqa: E402
from specpeft.adapters.tera import TeRAAdapter  # noqa: E402
from specpeft.init import tucker_cost  # noqa: E402
from specpeft.kernels import kronecker_linear, kronecker_merged_linear  # noqa: E402

Layer = dict[str, Tensor]
SHAPES = {  # (d_out, d_in): chain length, token counts
    (384, 384): (12, [64, 128, 192, 256, 384, 512, 1024]),
    (1536, 384): (12, [64, 128, 192, 256, 384, 512, 1024]),
    (384, 1536): (12, [64, 128, 192, 256, 384, 512, 1024]),
    (1024, 1024): (4, [128, 256, 384, 512, 768, 1024]),
}
BIG = {(4096, 4096): (2, [512, 1024, 2048])}


def adapter(d_out: int, d_in: int) -> TeRAAdapter:
    return TeRAAdapter.create(LayerGeometry("linear", (d_out, d_in)), TeRAConfig(target_modules=["x"]), None, None)


def model_switch(d_out: int, d_in: int, penalty: float) -> int:
    """The first token count (up to 16K) the CPU cost model runs merged at, with `penalty` in force."""
    saved = tucker_cost.KRONECKER_APPLY_PENALTY
    tucker_cost.KRONECKER_APPLY_PENALTY = penalty
    try:
        layer = adapter(d_out, d_in)  # a fresh adapter: its per-T cost memo is filled under this penalty
        return next((t for t in range(1, 1 << 14) if not layer.use_factored(t)), 1 << 14)
    finally:
        tucker_cost.KRONECKER_APPLY_PENALTY = saved


def chain(d_out: int, d_in: int, length: int) -> list[tuple[bool, Layer]]:
    """`length` layers (adapted?, tensors): the adapted shape, alternating with its frozen (d_in, d_out) partner when
    not square; the adapted layers carry the default layout's factors (A, B) with a small non-zero value."""
    shape = adapter(d_out, d_in).shape
    m1, n1, m2, n2 = tucker_cost.last_mode_split(shape.out_modes, shape.in_modes)
    gen = torch.Generator().manual_seed(0)
    layers = []
    for index in range(length):
        adapted = d_out == d_in or index % 2 == 0
        rows, cols = (d_out, d_in) if adapted else (d_in, d_out)
        tensors = {"W": torch.randn(rows, cols, generator=gen) / cols ** 0.5, "b": torch.randn(rows, generator=gen)}
        if adapted:
            tensors["A"] = (0.1 * torch.randn(1, m1, n1, generator=gen)).requires_grad_(True)
            tensors["B"] = (0.1 * torch.randn(1, m2, n2, generator=gen)).requires_grad_(True)
        layers.append((adapted, tensors))
    return layers


def run(layers: list[tuple[bool, Layer]], x: Tensor, path: str) -> None:
    h = x
    for adapted, t in layers:
        if not adapted or path == "frozen":
            h = F.linear(h, t["W"], t["b"])
        elif path == "factored":
            h = kronecker_linear(h, t["A"], t["B"], base_out=F.linear(h, t["W"], t["b"]), backend="torch")
        else:
            h = kronecker_merged_linear(h, t["A"], t["B"], t["W"], t["b"])
    h.sum().backward()


def measure(d_out: int, d_in: int, length: int, tokens: int, rounds: int) -> dict:
    layers = chain(d_out, d_in, length)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1), requires_grad=True)
    times: dict[str, list[float]] = {path: [] for path in ("frozen", "factored", "merged")}
    for path in times:  # warm-up
        run(layers, x, path)
    for _ in range(rounds):
        for path in times:
            start = time.perf_counter()
            run(layers, x, path)
            times[path].append(time.perf_counter() - start)
    pairs = {"merged_vs_factored": ("merged", "factored"), "factored_vs_frozen": ("factored", "frozen"),
             "merged_vs_frozen": ("merged", "frozen")}
    return {"shape": [d_out, d_in], "tokens": tokens, "layers": length, "times": times,
            **_harness.ratio_columns(times, pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--big", action="store_true", help="add 4096² at T = 512-2048")  # ≈ 2 min more
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = _harness.run_header("tera_switch", None)
    start = time.perf_counter()
    shapes = {**SHAPES, **(BIG if args.big else {})}
    rows, switches = [], {}
    for (d_out, d_in), (length, token_counts) in shapes.items():
        switches[f"{d_out}x{d_in}"] = {"model": model_switch(d_out, d_in, tucker_cost.KRONECKER_APPLY_PENALTY),
                                       "unscaled": model_switch(d_out, d_in, 1.0)}
        for tokens in token_counts:
            rows.append(measure(d_out, d_in, length, tokens, args.rounds))
            print(f"{d_out}×{d_in} T={tokens}: merged ÷ factored {rows[-1]['merged_vs_factored']:.3f}", flush=True)
    header["wall_s"] = time.perf_counter() - start
    lines = [
        "# TeRA default layout on CPU: factored vs merged in chains of adapted layers", "",
        _harness.header_markdown(header, f"Each row: a chain of layers of one shape under one backward, {args.rounds} "
                                 "round-robin rounds after one warm-up. Ratios: median over rounds of the per-round "
                                 "ratio, 95 % bootstrap interval in brackets (`_harness.paired_ratio`). \"model "
                                 "merges from\": the first token count `TeRAAdapter.use_factored` runs merged at, with "
                                 f"`KRONECKER_APPLY_PENALTY` = {tucker_cost.KRONECKER_APPLY_PENALTY} and unscaled (1.0)."),
        "| layer (out×in) | layers | T | merged ÷ factored | factored ÷ frozen | merged ÷ frozen | model merges from "
        "(unscaled) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        switch = switches[f"{row['shape'][0]}x{row['shape'][1]}"]
        lines.append(f"| {row['shape'][0]}×{row['shape'][1]} | {row['layers']} | {row['tokens']} | "
                     + _harness.ratio_cells(row, ("merged_vs_factored", "factored_vs_frozen", "merged_vs_frozen"))
                     + f" | {switch['model']} ({switch['unscaled']}) |")
    table = "\n".join(lines) + "\n"
    print(table)
    _harness.write_outputs(Path(args.out) if args.out else _harness.RESULTS, "tera_switch", table,
                           {"header": header, "args": vars(args), "switches": switches, "rows": rows})


if __name__ == "__main__":
    main()
