"""FedSVD server step: QR + small-SVD re-factorization vs the reference dense SVD of B·A.

    python benchmarks/fedsvd_server.py            # 4096×4096 (and 4096×11008 with --wide), r = 8; minutes: dense SVD
    python benchmarks/fedsvd_server.py --quick    # 1024×1024, r = 8, < 1 min

One server step = `FedSVDServer.aggregate` of 3 client ΔB updates (weighted by dataset size) followed by the
re-factorization of B·A, with refactor_method "qr" (O((m+n)r² + r³), never forms B·A) or "dense" (the official
code's `torch.linalg.svd` of the m×n product). Both are run in fp32 on the same state and updates. Reported:
median wall and process-CPU time per step (the QR route over --repeats runs; the dense route over --dense-repeats,
each takes minutes at 4096² on 2 cores), their ratio (target ≥ 20×), and the agreement of the two results:
‖B_qr A_qr − B_dn A_dn‖_F / ‖B A‖_F, max |A Aᵀ − I| of the QR route, and the max relative gap of the
singular values. Results: benchmarks/results/fedsvd_server{,_quick}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specpeft.adapters.fedsvd import orthonormal_rows  # noqa: E402
from specpeft.federated import ClientUpdate, FedSVDServer  # noqa: E402

TARGET_SPEEDUP = 20.0


def make_round(m: int, n: int, r: int, seed: int = 0) -> tuple[dict, list[ClientUpdate]]:
    """A global state {layer: (A orthonormal rows, B)} and 3 client ΔB updates of different sizes."""
    gen = torch.Generator().manual_seed(seed)
    state = {"layer": (orthonormal_rows(r, n, gen), torch.randn(m, r, generator=gen) * 0.1)}
    sizes = [300, 500, 200]
    updates = [ClientUpdate(k, n_k, {"layer": torch.randn(m, r, generator=gen) * 0.01}) for k, n_k in enumerate(sizes)]
    return state, updates


def timed_step(state: dict, updates: list[ClientUpdate], method: str) -> tuple[float, float, dict]:
    server = FedSVDServer(state, refactor_every=1, refactor_method=method)
    wall, cpu = time.perf_counter(), time.process_time()
    report = server.aggregate(updates)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert report.refactored and not report.rejected
    return wall, cpu, server.state


def bench(m: int, n: int, r: int, repeats: int, dense_repeats: int) -> dict:
    state, updates = make_round(m, n, r)
    timed_step(state, updates, "qr")  # warm up LAPACK
    qr_runs = [timed_step(state, updates, "qr") for _ in range(repeats)]
    # The QR route's ops are tiny (m×r, r×r): with 2 threads on a loaded machine each BLAS/LAPACK call can wait
    # a scheduler slice for its second thread, so the single-thread time is reported too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    qr_single = [timed_step(state, updates, "qr") for _ in range(repeats)]
    torch.set_num_threads(threads)
    qr_ms = statistics.median(w for w, _, _ in qr_runs) * 1e3
    print(f"[{m}×{n}, r={r}] QR route: median {qr_ms:.2f} ms; dense ...", flush=True)
    dense_runs = [timed_step(state, updates, "dense") for _ in range(dense_repeats)]
    (a_qr, b_qr), (a_dn, b_dn) = qr_runs[0][2]["layer"], dense_runs[0][2]["layer"]
    product_dn = b_dn.double() @ a_dn.double()  # (m, r)·(r, n): only for the accuracy check, not timed
    gap = b_qr.double() @ a_qr.double() - product_dn
    rel_diff = float(torch.linalg.matrix_norm(gap) / torch.linalg.matrix_norm(product_dn))
    ortho = float((a_qr.double() @ a_qr.double().T - torch.eye(r, dtype=torch.float64)).abs().max())
    s_qr, s_dn = b_qr.double().norm(dim=0), b_dn.double().norm(dim=0)
    row = {
        "shape": [m, n],
        "rank": r,
        "qr_wall_ms": statistics.median(w for w, _, _ in qr_runs) * 1e3,
        "qr_cpu_ms": statistics.median(c for _, c, _ in qr_runs) * 1e3,
        "qr_1thread_wall_ms": statistics.median(w for w, _, _ in qr_single) * 1e3,
        "dense_wall_ms": statistics.median(w for w, _, _ in dense_runs) * 1e3,
        "dense_cpu_ms": statistics.median(c for _, c, _ in dense_runs) * 1e3,
        "qr_wall_all_ms": [w * 1e3 for w, _, _ in qr_runs],
        "dense_wall_all_ms": [w * 1e3 for w, _, _ in dense_runs],
        "product_rel_diff": rel_diff,
        "A_orthonormality_err": ortho,
        "sigma_max_rel_gap": float(((s_qr - s_dn).abs() / s_dn[0]).max()),
    }
    row["speedup_wall"] = row["dense_wall_ms"] / row["qr_wall_ms"]
    row["speedup_cpu"] = row["dense_cpu_ms"] / row["qr_cpu_ms"]
    row["speedup_vs_1thread_qr"] = row["dense_wall_ms"] / row["qr_1thread_wall_ms"]
    row["pass"] = row["speedup_wall"] >= TARGET_SPEEDUP
    dense_s, speedup, speedup_cpu = row["dense_wall_ms"] / 1e3, row["speedup_wall"], row["speedup_cpu"]
    print(f"  dense {dense_s:.1f} s -> speedup {speedup:.0f}× (CPU {speedup_cpu:.0f}×)", flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    ok = lambda b: "✅" if b else "❌"  # noqa: E731
    lines = [
        "# FedSVD server step: QR route vs dense SVD",
        "",
        f"`{meta['command']}` — torch {meta['torch']}, {meta['threads']} threads, fp32, one step = weighted mean "
        f"of 3 client ΔB + re-factorization of B·A. QR: median of {meta['repeats']} runs; dense: median of "
        f"{meta['dense_repeats']}. {meta['date']}; shared machine, load average {meta['loadavg'][0]:.1f} at start, "
        f"{meta['loadavg_end'][0]:.1f} at end on {os.cpu_count()} cores (CPU = process CPU time).",
        "",
        "| B·A shape | r | dense SVD wall / CPU | QR route wall / CPU | speedup wall (≥20×) / CPU "
        "| QR route, 1 thread: wall, speedup | ‖ΔBA‖/‖BA‖ QR vs dense | max‖AAᵀ−I‖ (QR) "
        "| max σ gap / σ₁ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape'][0]}×{row['shape'][1]} | {row['rank']} "
            f"| {row['dense_wall_ms'] / 1e3:.2f} s / {row['dense_cpu_ms'] / 1e3:.2f} s "
            f"| {row['qr_wall_ms']:.2f} ms / {row['qr_cpu_ms']:.2f} ms "
            f"| {row['speedup_wall']:.0f}× {ok(row['pass'])} / {row['speedup_cpu']:.0f}× "
            f"| {row['qr_1thread_wall_ms']:.2f} ms, {row['speedup_vs_1thread_qr']:.0f}× "
            f"| {row['product_rel_diff']:.1e} | {row['A_orthonormality_err']:.1e} | {row['sigma_max_rel_gap']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024×1024 only (< 1 min)")
    parser.add_argument("--wide", action="store_true", help="add 4096×11008 (one more multi-minute dense SVD)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20, help="QR-route runs")
    parser.add_argument("--dense-repeats", type=int, default=None, help="dense runs (default 3 quick, 1 full)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    shapes = [(1024, 1024)] if args.quick else [(4096, 4096)] + ([(4096, 11008)] if args.wide else [])
    dense_repeats = args.dense_repeats or (3 if args.quick else 1)
    load = os.getloadavg()
    rows = [bench(m, n, args.rank, args.repeats, dense_repeats) for m, n in shapes]
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "dense_repeats": dense_repeats,
        "date": time.strftime("%Y-%m-%d"),
        "loadavg": load,
        "loadavg_end": os.getloadavg(),
    }
    table = markdown(rows, meta)
    stem = "fedsvd_server_quick" if args.quick else "fedsvd_server"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    payload = {"meta": meta, "target_speedup": TARGET_SPEEDUP, "rows": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    print(table)


if __name__ == "__main__":
    main()
