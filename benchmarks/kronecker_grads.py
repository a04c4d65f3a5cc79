"""Kronecker factor gradients dA, dB of y = x (Σ_k A_k ⊗ B_k)ᵀ: the 2-D GEMM form against autograd through einsum.

    python benchmarks/kronecker_grads.py            # T = 1024, 21 rounds (≈ 1 min on 2 cores)
    python benchmarks/kronecker_grads.py --quick    # 5 rounds

"2-D GEMMs" is `specpeft.kernels.kronecker_torch.kronecker_factor_grads` (the backward of the Triton
`kernels.kronecker_linear` and of TeRA's merged path), which starts from x and dY alone; "einsum from x, dY" is the same
contraction as four per-token einsums (the Triton backward's previous form); "einsum autograd" is `torch.autograd.grad`
of `kernels.kronecker_linear_reference`'s output with respect to A and B on a graph built once (retain_graph): the
backward alone, its forward intermediate X Bᵀ already saved. All are also ÷ the dense dΔ = gᵀx GEMM (T·m·n MACs)
they replace in a merged-weight backward. Shapes:
TeRA default layouts (Δ = P ⊗ M_N, R = 1) at MiniLM and LLM widths and a SoKA-like R = 4 product. Rounds run the
variants in turn; medians. Results: benchmarks/results/kronecker_grads{,_quick}.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
from specpeft.kernels import kronecker_linear_reference  # noqa: E402
from specpeft.kernels.kronecker_torch import kronecker_factor_grads  # noqa: E402

# (label, R, m1, n1, m2, n2)
SHAPES = [
    ("TeRA 384×384", 1, 24, 24, 16, 16),
    ("TeRA 384×1536", 1, 64, 64, 6, 24),
    ("TeRA 1536×384", 1, 64, 64, 24, 6),
    ("TeRA 4096×4096", 1, 128, 128, 32, 32),
    ("R = 4, 1024×1024", 4, 32, 32, 32, 32),
]


def einsum_from_inputs(x: torch.Tensor, g: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple:
    """dA_k = Σ_t (G_t B_k) X_tᵀ, dB_k = Σ_t G_tᵀ (A_k X_t) by per-token einsums."""
    (_, m1, n1), (_, m2, n2) = A.shape, B.shape
    X, G = x.view(-1, n1, n2), g.view(-1, m1, m2)  # (T, n1·n2) -> (T, n1, n2); (T, m1·m2) -> (T, m1, m2)
    grad_a = torch.einsum("tkiq,tpq->kip", torch.einsum("tij,kjq->tkiq", G, B), X)
    grad_b = torch.einsum("tij,tkiq->kjq", G, torch.einsum("kip,tpq->tkiq", A, X))
    return grad_a, grad_b


def timed_rounds(variants: dict[str, callable], rounds: int) -> dict[str, float]:
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, run in variants.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: 1e3 * statistics.median(values) for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = _harness.run_header("kronecker_grads", None)
    rounds = 5 if args.quick else 21
    rows = []
    for label, R, m1, n1, m2, n2 in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.tokens, n1 * n2, generator=gen)
        g = torch.randn(args.tokens, m1 * m2, generator=gen)
        A = torch.randn(R, m1, n1, generator=gen).requires_grad_(True)
        B = torch.randn(R, m2, n2, generator=gen).requires_grad_(True)
        y = kronecker_linear_reference(x, A, B)
        ms = timed_rounds({
            "2-D GEMMs": lambda: kronecker_factor_grads(x, g, A.detach(), B.detach()),
            "einsum from x, dY": lambda: einsum_from_inputs(x, g, A.detach(), B.detach()),
            "einsum autograd": lambda: torch.autograd.grad(y, [A, B], g, retain_graph=True),
            "dΔ = gᵀx GEMM": lambda: g.T @ x,
        }, rounds)
        rows.append({"shape": label, "R": R, "A": (m1, n1), "B": (m2, n2), **ms})
        print(f"{label}: {ms}", file=sys.stderr)
    lines = [
        "# Kronecker factor gradients: 2-D GEMMs vs einsum autograd", "",
        _harness.header_markdown(header, f"T = {args.tokens} tokens, fp32, median of {rounds} rounds."),
        "| shape | R | A ⊗ B | 2-D GEMMs ms | einsum from x, dY ms | einsum autograd ms | dΔ GEMM ms | 2-D ÷ einsum "
        "from x, dY | 2-D ÷ einsum autograd | 2-D ÷ dΔ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['shape']} | {r['R']} | {r['A'][0]}×{r['A'][1]} ⊗ {r['B'][0]}×{r['B'][1]} | {r['2-D GEMMs']:.2f} | "
              f"{r['einsum from x, dY']:.2f} | {r['einsum autograd']:.2f} | {r['dΔ = gᵀx GEMM']:.2f} | "
              f"{r['2-D GEMMs'] / r['einsum from x, dY']:.2f} | {r['2-D GEMMs'] / r['einsum autograd']:.2f} | "
              f"{r['2-D GEMMs'] / r['dΔ = gᵀx GEMM']:.2f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    _harness.write_outputs(_harness.RESULTS, "kronecker_grads_quick" if args.quick else "kronecker_grads", table,
                           {"header": header, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
