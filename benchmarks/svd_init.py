"""Full vs randomized truncated SVD on LLM-sized matrices with a slowly decaying spectrum.

    python benchmarks/svd_init.py            # 4096×4096 and 4096×11008, r = 16 and 64 (several minutes on 2 cores)
    python benchmarks/svd_init.py --quick    # 1024×1024 and 1024×2752, < 30 s

Test matrices: W = Q1 diag(σ) Q2ᵀ with σ_i = i^-0.5 (i = 1..min(m, n)), the slow decay anchors/performance.md §3.2
measured and that pretrained weights show. Q1, Q2 have exactly orthonormal columns but are not built by QR of a
4096-wide Gaussian (seconds per factor on CPU): each is kron(H_a[:, :c], H_64) with Haar-random H_a, H_64 from QR of
small Gaussians, followed by a random row permutation. The randomized SVD's error and subspace accuracy do not depend
on which orthonormal factors are used, only on σ: its Gaussian sketch satisfies Q2ᵀΩ ~ Ω in distribution, and the
metrics below are rotation-invariant. Building W costs one (m×k)·(k×n) GEMM, and the planted σ and Q1[:, :r],
Q2[:, :r] are exact references, so accuracy needs no float64 SVD. The full SVD is run anyway for its timing, and its
σ is checked against the planted ones.

Metrics per (matrix, r): full `torch.linalg.svd(full_matrices=False)` wall time (once per matrix, shared by both r);
median wall time of `truncated_svd(kind="randomized")` (q = r + max(8, r//2), niter = 4) over --repeats seeds;
worst-over-seeds error ratio ‖W − U S Vᵀ‖_F / sqrt(Σ_{i>r} σ_i²) and min principal cosine of the top-r left and right
subspaces; the same for `torch.svd_lowrank(q=r, niter=4)` (PEFT's pissa_niter_4, no oversampling) for contrast.
Targets: randomized ≥ 50× faster than full, error ≤ 1.01× optimal, min cosine ≥ 0.95.
Results: benchmarks/results/svd_init{,_quick}.{md,json}.
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
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specpeft.init.svd import SVDInit, truncated_svd  # noqa: E402

BLOCK = 64  # every benchmarked dimension is a multiple of 64, so factors are kron(H_a[:, :c], H_64)
# Non-default settings, to show what the last singular vectors need when the default misses the cosine target.
VARIANTS = {"niter=6": lambda r: {"niter": 6}, "oversample=r": lambda r: {"oversample": r}}
TARGETS = {"speedup": 50.0, "err_ratio": 1.01, "min_cos": 0.95}


def haar(n: int, gen: torch.Generator) -> Tensor:
    """Haar-distributed n×n orthogonal matrix (QR of a Gaussian, signs fixed by diag(R))."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def orthonormal_columns(m: int, k: int, gen: torch.Generator) -> Tensor:
    """m×k fp32 matrix with orthonormal columns: row-permuted kron(H_(m/64)[:, :k/64], H_64)."""
    a, c = m // BLOCK, k // BLOCK
    q = torch.kron(haar(a, gen)[:, :c], haar(BLOCK, gen))
    return q[torch.randperm(m, generator=gen)].float()


def planted_matrix(m: int, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if m % BLOCK or n % BLOCK:
        raise ValueError(f"matrix dims must be multiples of {BLOCK}, got {m}×{n}")
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    sigma = torch.arange(1, k + 1, dtype=torch.float64) ** -0.5
    q1, q2 = orthonormal_columns(m, k, gen), orthonormal_columns(n, k, gen)
    return (q1 * sigma.float()) @ q2.T, sigma, q1, q2


def min_cosine(reference: Tensor, estimate: Tensor) -> float:
    return float(torch.linalg.svdvals(reference.T @ estimate).min())


def frobenius(x: Tensor) -> float:
    """‖x‖_F summed in float64 over row blocks: fp32 torch norms lose ~1e-3 relative at 4096² on CPU."""
    rows = max(1, (1 << 20) // x.shape[1])
    return sum(float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2 for b in x.split(rows)) ** 0.5


def accuracy(w: Tensor, sigma: Tensor, q1: Tensor, q2: Tensor, u: Tensor, s: Tensor, v: Tensor) -> dict[str, float]:
    r = s.numel()
    optimal = float(sigma[r:].pow(2).sum().sqrt())
    err = frobenius(w - (u * s) @ v.T)
    return {"err_ratio": err / optimal, "cos_u": min_cosine(q1[:, :r], u), "cos_v": min_cosine(q2[:, :r], v)}


def timed(fn):  # type: ignore[no-untyped-def]
    """(wall s, process CPU s, fn()): CPU time is the steadier number when other jobs share the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def run_randomized(
    w: Tensor, sigma: Tensor, q1: Tensor, q2: Tensor, r: int, repeats: int, options: dict
) -> tuple[list[float], list[dict[str, float]]]:
    times, accs = [], []
    for seed in range(repeats):
        t, cpu, (u, s, v) = timed(lambda: truncated_svd(w, r, SVDInit(kind="randomized", seed=seed, **options)))
        times.append((t, cpu))
        accs.append(accuracy(w, sigma, q1, q2, u, s, v))
    return times, accs


def bench_matrix(m: int, n: int, ranks: list[int], repeats: int) -> list[dict]:
    w, sigma, q1, q2 = planted_matrix(m, n, seed=0)
    print(f"[{m}×{n}] full torch.linalg.svd ...", flush=True)
    t_full, cpu_full, (_, s_full, _) = timed(lambda: torch.linalg.svd(w, full_matrices=False))
    sigma_dev = float(((s_full.double() - sigma).abs() / sigma[0]).max())
    rows = []
    for r in ranks:
        times, accs = run_randomized(w, sigma, q1, q2, r, repeats, {})
        variants = {}
        for name, options in VARIANTS.items():
            v_times, v_accs = run_randomized(w, sigma, q1, q2, r, repeats, options(r))
            variants[name] = {
                "t_s": statistics.median(t for t, _ in v_times),
                "err_ratio": max(a["err_ratio"] for a in v_accs),
                "min_cos": min(min(a["cos_u"], a["cos_v"]) for a in v_accs),
            }
        torch.manual_seed(0)
        t_peft, _, (u, s, v) = timed(lambda: torch.svd_lowrank(w, q=r, niter=4))
        peft = accuracy(w, sigma, q1, q2, u, s, v)
        row = {
            "shape": [m, n],
            "rank": r,
            "t_full_s": t_full,
            "cpu_full_s": cpu_full,
            "t_rand_s": statistics.median(t for t, _ in times),
            "cpu_rand_s": statistics.median(c for _, c in times),
            "t_rand_all_s": [t for t, _ in times],
            "err_ratio": max(a["err_ratio"] for a in accs),
            "min_cos_u": min(a["cos_u"] for a in accs),
            "min_cos_v": min(a["cos_v"] for a in accs),
            "peft_q_eq_r": {"t_s": t_peft, **peft},
            "variants": variants,
            "full_sigma_max_dev_rel": sigma_dev,
        }
        row["speedup"] = t_full / row["t_rand_s"]
        row["speedup_cpu"] = cpu_full / row["cpu_rand_s"]
        row["pass"] = {
            "speedup": row["speedup"] >= TARGETS["speedup"],
            "err_ratio": row["err_ratio"] <= TARGETS["err_ratio"],
            "min_cos": min(row["min_cos_u"], row["min_cos_v"]) >= TARGETS["min_cos"],
        }
        print(f"  r={r}: rand {row['t_rand_s']:.3f}s, speedup {row['speedup']:.0f}x (CPU {row['speedup_cpu']:.0f}x), "
              f"err/opt {row['err_ratio']:.4f}, cos {row['min_cos_u']:.3f}/{row['min_cos_v']:.3f}", flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    ok = lambda b: "✅" if b else "❌"  # noqa: E731
    lines = [
        "# SVD init: full vs randomized truncated SVD",
        "",
        f"`python benchmarks/svd_init.py{' --quick' if meta['quick'] else ''}` — torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['cpu']}, fp32, σ_i ∝ i^-0.5, randomized q = r + max(8, r//2), niter = 4, "
        f"{meta['repeats']} seeds (time: median; accuracy: worst). {meta['date']}. Timings as measured on a shared "
        f"machine: load average {meta['loadavg_1_5_15min']['start'][0]:.1f} at start, "
        f"{meta['loadavg_1_5_15min']['end'][0]:.1f} at end on {os.cpu_count()} cores; CPU = process CPU time.",
        "",
        "| matrix | r | full SVD wall / CPU (s) | randomized wall / CPU (s) | speedup wall (≥50×) / CPU "
        "| err/opt (≤1.01) | min cos U / V (≥0.95) | PEFT q=r: wall s, err/opt, min cos U / V |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["peft_q_eq_r"]
        lines.append(
            f"| {row['shape'][0]}×{row['shape'][1]} | {row['rank']} | {row['t_full_s']:.1f} / {row['cpu_full_s']:.1f} "
            f"| {row['t_rand_s']:.3f} / {row['cpu_rand_s']:.3f} "
            f"| {row['speedup']:.0f}× {ok(row['pass']['speedup'])} / {row['speedup_cpu']:.0f}× "
            f"| {row['err_ratio']:.4f} {ok(row['pass']['err_ratio'])} "
            f"| {row['min_cos_u']:.4f} / {row['min_cos_v']:.4f} {ok(row['pass']['min_cos'])} "
            f"| {p['t_s']:.3f}, {p['err_ratio']:.4f}, {p['cos_u']:.3f} / {p['cos_v']:.3f} |"
        )
    names = list(rows[0]["variants"])
    lines += [
        "",
        "Non-default randomized settings (median wall s; worst err/opt; worst min cosine over U and V):",
        "",
        "| matrix | r | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for row in rows:
        cells = [
            f"{v['t_s']:.3f} s, {v['err_ratio']:.4f}, {v['min_cos']:.3f}" for v in row["variants"].values()
        ]
        lines.append(f"| {row['shape'][0]}×{row['shape'][1]} | {row['rank']} | " + " | ".join(cells) + " |")
    dev = max(row["full_sigma_max_dev_rel"] for row in rows)
    lines += ["", f"Full-SVD σ vs planted σ: max |Δσ|/σ_1 = {dev:.1e} (the planted references are exact)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024-sized matrices (< 30 s)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3, help="randomized runs (seeds 0..N-1) per (matrix, r)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    shapes = [(1024, 1024), (1024, 2752)] if args.quick else [(4096, 4096), (4096, 11008)]
    truncated_svd(torch.randn(256, 256), 8, SVDInit(kind="randomized"))  # warm up BLAS/LAPACK thread pools
    load_start = os.getloadavg()
    rows = [row for m, n in shapes for row in bench_matrix(m, n, args.ranks, args.repeats)]

    meta = {
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d"),
        "loadavg_1_5_15min": {"start": load_start, "end": os.getloadavg()},
    }
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            meta["cpu"] = line.split(":", 1)[1].strip()
            break
    table = markdown(rows, meta)
    stem = "svd_init_quick" if args.quick else "svd_init"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "targets": TARGETS, "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
