"""Kernel families (specpeft/kernels): fwd and fwd+bwd time ÷ the frozen base GEMM and ÷ the eager torch path.

    python benchmarks/kernel_speed.py            # CUDA: out×in 4096×4096 and 4096×11008, T ∈ {512, 4096, 16384}, bf16
                                            # CPU (no GPU): the torch reference paths on 1024×1024 and 1024×2752,
                                            #   T ∈ {128, 512}, fp32 (~2-4 min on 2 cores)
    python benchmarks/kernel_speed.py --quick    # first shape, smallest T, fewer rounds
    python benchmarks/kernel_speed.py --shapes 4096x4096 --tokens 512,4096 --dtype bf16   # any grid
    python benchmarks/kernel_speed.py --compile-check   # no GPU needed: compile every kernel config for sm_90 (ptxas)
                                                   #   and report registers / spill stack / shared memory

Families and settings (issue 9; targets from anchors/performance.md §0, M1-M4, on an H100):
    frozen base   y = x Wᵀ (x requires grad, so fwd+bwd includes dX)                     the denominator
    lowrank       y = x Wᵀ + ((x V) ⊙ s) Uᵀ, r = 16, V, s, U trainable (LoRA-like)      fwd ≤ 1.10, fwd+bwd ≤ 1.15
    kronecker     y = x Wᵀ + Σ_k A_k X B_kᵀ, SoKA factor shapes, R = 4 components          ≤ 1.25
    tucker        y = x (W + Δ)ᵀ, TeRA N = 3, R_k = 16, factors trainable (mode "auto")    ≤ 1.25
    snella        y = x (W + s·K_eff)ᵀ, d = 32 (2 heads), 50 % kept, "code" mask           ≥ 0.7× LoRA r = 32 throughput
Paths: "kernel" is the public op on its automatic backend (Triton on CUDA); "eager" is its `*_reference`
(plain torch ops, autograd). Without CUDA both would be the same torch code, so only the eager path is timed and
every row says so: the Triton numbers come from a CUDA run (kernels_cuda.md).

Timing: warm-up rounds (Triton autotuning happens there), then `--repeats` rounds in which every variant runs once
in turn; a ratio is the median over rounds of (variant time ÷ frozen-base time in the same round), which cancels load
drift. CUDA times use events after a synchronize; CPU uses torch.set_num_threads(2) and perf_counter.
Results: benchmarks/results/kernels_{cuda,cpu}{,_quick}.{md,json}, kernels_compile_sm90.md.
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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specpeft import kernels as K  # noqa: E402
from specpeft.init.kronecker import choose_factor_shape  # noqa: E402
from specpeft.init.tucker import TuckerShape  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"lowrank": (1.10, 1.15), "kronecker": (1.25, 1.25), "tucker": (1.25, 1.25)}
SNELLA_TARGET = 0.7  # SNELLA throughput ÷ LoRA r = 32 throughput, fwd+bwd


class Case:
    """One variant: a forward closure and the tensors whose gradients the backward computes."""

    def __init__(self, forward: Callable[[], Tensor], grad_inputs: list[Tensor]) -> None:
        self.forward, self.grad_inputs = forward, grad_inputs


def make_cases(m: int, n: int, T: int, dtype: torch.dtype, device: str, on_gpu: bool) -> dict[str, dict[str, Case]]:
    """family -> {"base", "kernel", "eager", ...} closures for an out×in = m×n layer and T tokens."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s, scale=1.0, grad=False, dt=torch.float32: (  # noqa: E731
        (torch.randn(*s, generator=gen) * scale).to(device, dt).requires_grad_(grad))
    x = rand(T, n, dt=dtype, grad=True)
    W = rand(m, n, scale=n ** -0.5, dt=dtype)
    base = Case(lambda: F.linear(x, W), [x])
    families: dict[str, dict[str, Case]] = {}

    V, s, U = rand(n, 16, scale=n ** -0.5, grad=True), rand(16, grad=True), rand(m, 16, scale=0.01, grad=True)
    lowrank = [x, V, s, U]
    families["lowrank"] = {
        "kernel": Case(lambda: K.lowrank_linear(x, V, s, U, weight=W), lowrank),
        "eager": Case(lambda: K.lowrank_linear_reference(x, V, s, U, weight=W), lowrank),
    }

    shape = choose_factor_shape(m, n)
    (m1, n1), (m2, n2) = shape.a_shape, shape.b_shape
    A, B = rand(4, m1, n1, scale=0.05, grad=True), rand(4, m2, n2, scale=0.05, grad=True)
    kron = [x, A, B]
    families["kronecker"] = {
        "kernel": Case(lambda: K.kronecker_linear(x, A, B, base_out=F.linear(x, W), out_features=m), kron),
        "eager": Case(lambda: K.kronecker_linear_reference(x, A, B, base_out=F.linear(x, W), out_features=m), kron),
    }

    tshape = TuckerShape.for_matrix(m, n, 3, 16)
    core = rand(*tshape.ranks, scale=n ** -0.5)
    factors = [rand(j, r, scale=r ** -0.5, grad=True) for j, r in zip(tshape.mode_sizes, tshape.ranks)]
    modes = (tshape.out_modes, tshape.in_modes)
    tucker = [x, *factors]
    families["tucker"] = {
        "kernel": Case(lambda: K.tucker_linear(x, core, factors, *modes, weight=W), tucker),
        "eager": Case(lambda: K.tucker_linear_reference(x, core, factors, *modes, weight=W), tucker),
    }

    A_q, B_q = rand(2, n, 16, scale=0.3, grad=True), rand(2, m, 16, scale=0.3, grad=True)
    alpha, gamma, beta, scale = (torch.tensor(v, device=device, requires_grad=True) for v in (1.0, 1.0, 0.0, 0.1))
    with torch.no_grad():
        magnitude = K.snella_kernel_matrix(A_q, B_q, alpha, gamma, beta).abs().flatten()
        tau = float(magnitude.kthvalue(magnitude.numel() // 2).values)  # 50 % kept
        del magnitude
    snella_args = dict(alpha=alpha, gamma=gamma, beta=beta, weight=W)
    snella = [x, A_q, B_q, alpha, gamma, beta, scale]
    la, lb = rand(32, n, scale=n ** -0.5, grad=True), rand(m, 32, scale=0.01, grad=True)
    families["snella"] = {
        "kernel": Case(lambda: K.snella_linear(x, A_q, B_q, scale, tau, **snella_args), snella),
        "kernel, materialize": Case(lambda: K.snella_linear(x, A_q, B_q, scale, tau, **snella_args,
                                                            materialize=True), snella),
        "eager": Case(lambda: K.snella_linear_reference(x, A_q, B_q, scale, tau, **snella_args), snella),
        "LoRA r=32 (eager)": Case(lambda: F.linear(x, W) + (x @ la.T.to(dtype)) @ lb.T.to(dtype), [x, la, lb]),
    }
    if not on_gpu:  # the "kernel" op would run the same torch reference: time it once, as "eager"
        for cases in families.values():
            for name in [k for k in cases if k.startswith("kernel")]:
                del cases[name]
    return {"base": {"frozen base": base}, **families}


def run_once(case: Case, backward: bool, device: str) -> float:
    """Seconds for one forward (no grad) or one forward + backward of `case`."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    if backward:
        y = case.forward()
        torch.autograd.grad(y, case.grad_inputs, torch.ones_like(y))
    else:
        with torch.no_grad():
            case.forward()
    if device == "cuda":
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    return time.perf_counter() - t0


def measure(cases: dict[str, dict[str, Case]], rounds: int, warmup: int, device: str) -> dict:
    """Median times and per-round ratios to the frozen base, for every variant, fwd and fwd+bwd."""
    flat = {(fam, name): case for fam, group in cases.items() for name, case in group.items()}
    times: dict = {key: {"fwd": [], "fwd+bwd": []} for key in flat}
    for round_index in range(warmup + rounds):
        for key, case in flat.items():
            for mode in ("fwd", "fwd+bwd"):
                elapsed = run_once(case, mode == "fwd+bwd", device)
                if round_index >= warmup:
                    times[key][mode].append(elapsed)
    base = times[("base", "frozen base")]
    out = {}
    for key, series in times.items():
        out[key] = {}
        for mode, values in series.items():
            ratios = [v / b for v, b in zip(values, base[mode])]
            out[key][mode] = {"ms": 1e3 * statistics.median(values), "vs_base": statistics.median(ratios)}
    return out


def compile_check() -> str:
    """Compile every kernel at its GPU launch configs for sm_90 (Triton's bundled ptxas; no GPU needed)."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from specpeft.kernels import _snella_kernels as sk
    from specpeft.kernels import kronecker, lowrank, snella, tucker

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []

    def check(label: str, fn, pointers: dict, constants: dict, warps: int, stages: int = 3,
              ones: tuple[str, ...] = (), plain: tuple[str, ...] = ()) -> None:
        """Compile like the JIT does at the benchmark shapes: pointers 16-byte aligned, integer arguments divisible
        by 16 (4096, 11008, T, r = 16) except `plain`, unit strides (`ones`) specialized to the constant 1."""
        constants = {**constants, **{name: 1 for name in ones}}
        signature, attrs = {}, {}
        for index, name in enumerate(fn.arg_names):
            if name in constants:
                signature[name] = "constexpr"
                continue
            if name.endswith("_ptr"):
                signature[name] = pointers.get(name, pointers["*"])
            else:
                signature[name] = "fp32" if name == "tau" else "i32"
            if name != "tau" and name not in plain:
                attrs[(index,)] = [["tt.divisibility", 16]]
        try:
            kernel = triton_compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": warps, "num_stages": stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
                handle.write(kernel.asm["cubin"])
                handle.flush()
                usage = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True,
                                       text=True).stdout
            regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
            rows.append(f"| {label} | {warps} | {stages} | {regs} | {stack} | {kernel.metadata.shared} |")
        except Exception as exc:  # report, do not hide: a failing config is a finding
            rows.append(f"| {label} | {warps} | {stages} | FAILED: {type(exc).__name__} | | |")
        print(rows[-1], flush=True)

    bf16 = {"*": "*bf16", "p_ptr": "*fp32", "s_ptr": "*fp32"}
    for config in lowrank._shrink_tuned.configs:
        meta = config.kwargs
        check(f"lowrank shrink BM={meta['BM']} BK={meta['BK']}", lowrank._shrink_kernel, bf16,
              dict(**meta, BR=16, UPCAST=False, PRECISION="tf32"), config.num_warps, config.num_stages,
              ones=("stride_xk", "stride_vr"))
    for config in lowrank._main_tuned.configs:
        meta = config.kwargs
        check(f"lowrank main {meta['BM']}×{meta['BN']}×{meta['BK']}", lowrank._main_kernel, bf16,
              dict(**meta, HAS_W=True, HAS_BIAS=True, HAS_BASE=False, BR=16, GROUP_M=8, UPCAST=False,
                   PRECISION="tf32"), config.num_warps, config.num_stages, ones=("stride_xk", "stride_wk", "stride_ur"))
    block = kronecker.GPU_BLOCK_MAX
    check(f"kronecker {block}-tiles", kronecker._kron_kernel, {"*": "*bf16"},
          dict(HAS_BASE=True, BI=block, BJ=block, BP=block, BQ=block, UPCAST=False, PRECISION="tf32"),
          kronecker.GPU_WARPS, ones=("stride_xq", "stride_ap", "stride_bq", "stride_yj"), plain=("R",))
    check("tucker build", tucker._build_kernel, {"*": "*fp32", "outer_ptr": "*i32", "w0_ptr": "*bf16",
                                                  "out_ptr": "*bf16"},
          dict(HAS_W0=True, BO=tucker.GPU_BUILD_BLOCK_OUTER, BJ=tucker.GPU_BUILD_BLOCK_LAST, BR=16, UPCAST=False),
          tucker.GPU_BUILD_WARPS)
    io = {"*": "*fp32", **{name: "*bf16" for name in ("x_ptr", "gy_ptr", "w0_ptr", "bias_ptr", "y_ptr", "out_ptr")}}
    gen = dict(UPCAST=False, GEN_PREC=snella.GEN_PRECISION)
    bm, bn, bk, warps = snella.GPU_GEMM
    for transposed in (False, True):
        check(f"snella GEMM {'dx' if transposed else 'fwd'} {bm}×{bn}×{bk}", sk._gemm_kernel, io,
              dict(TRANSPOSED=transposed, IS_MIX=True, CODE=True, HAS_W0=True, HAS_BIAS=not transposed, BM=bm, BN=bn,
                   BK=bk, BR=16, PRECISION="tf32", **gen), warps, plain=("H",))
    bj, bi, warps = snella.GPU_BUILD
    check(f"snella build {bj}×{bi}", sk._build_kernel, io,
          dict(IS_MIX=True, CODE=True, HAS_W0=True, BJ=bj, BI=bi, BR=16, **gen), warps, plain=("H",))
    bj, bi, warps = snella.GPU_TILE
    for dense in (False, True):
        check(f"snella grad pass 1 {'dense dΔ' if dense else 'fused dΔ'} {bj}×{bi}", sk._grad_pass1_kernel, io,
              dict(IS_MIX=True, CODE=True, DENSE_GRAD=dense, BJ=bj, BI=bi, BT=snella.GPU_TOKENS, BR=16,
                   PRECISION="tf32", **gen), warps, plain=("H",))
    check(f"snella grad pass 2 {bj}×{bi}", sk._grad_pass2_kernel, io, dict(BJ=bj, BI=bi, BR=16, **gen), warps,
          plain=("H",))
    bj, bi, warps = snella.GPU_STATS
    check(f"snella column stats {bj}×{bi}", sk._column_stats_kernel, io,
          dict(BJ=bj, BI=bi, BR=16, UPCAST=False, PRECISION=snella.GEN_PRECISION), warps, plain=("H",))
    return ("# Kernel compile check: sm_90 (H100), bf16 I/O, Triton " + triton.__version__ + "\n\n"
            "Compiled offline (ttir → ptx → cubin with Triton's ptxas; no GPU involved); resources from cuobjdump. "
            "A non-zero spill stack means registers spilled to local memory.\n\n"
            "| kernel / config | warps | stages | registers | spill stack (B) | shared (B) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="first shape, smallest T, fewer rounds")
    parser.add_argument("--shapes", help="comma list of OUTxIN, e.g. 4096x4096,4096x11008")
    parser.add_argument("--tokens", help="comma list of T")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 10 CUDA / 3 CPU)")
    parser.add_argument("--compile-check", action="store_true",
                        help="compile every kernel config for sm_90 and report registers/spills (no GPU needed)")
    args = parser.parse_args()
    if args.compile_check:
        text = compile_check()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "kernels_compile_sm90.md").write_text(text)
        print("\n" + text + f"\nwrote {RESULTS / 'kernels_compile_sm90.md'}")
        return

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        torch.set_num_threads(2)
    shapes = args.shapes or ("4096x4096,4096x11008" if on_gpu else "1024x1024,1024x2752")
    tokens = args.tokens or ("512,4096,16384" if on_gpu else "128,512")
    shape_list = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]
    token_list = [int(t) for t in tokens.split(",")]
    if args.quick:
        shape_list, token_list = shape_list[:1], token_list[:1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if on_gpu else "fp32")]
    rounds = args.repeats or (3 if args.quick else (10 if on_gpu else 3))
    warmup = 2 if on_gpu else 1

    cpu_name = platform.processor() or platform.machine()
    hardware = torch.cuda.get_device_name() if on_gpu else f"CPU ({cpu_name}, 2 threads)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    backend = K.kernel_backend(torch.zeros(1, device=device))
    header = (f"# Kernel families: time ÷ frozen base GEMM\n\n{hardware}; torch {torch.__version__}; "
              f"{dtype}; median of {rounds} rounds after {warmup} warm-up; automatic backend: **{backend}**; "
              f"1-min load average at start {load:.1f} on {os.cpu_count()} cores (other jobs share the machine).\n")
    if not on_gpu:
        header += ("\n**No GPU: every row times the torch reference path (eager), not a Triton kernel. The Triton "
                   "numbers come from a CUDA run** (`python benchmarks/kernel_speed.py` on CUDA: kernels_cuda.md).\n")
    rows, snella_rows, raw = [], [], []
    for m, n in shape_list:
        for T in token_list:
            print(f"measuring {m}x{n}, T={T} ...", flush=True)
            result = measure(make_cases(m, n, T, dtype, device, on_gpu), rounds, warmup, device)
            base = result[("base", "frozen base")]
            raw.append({"shape": [m, n], "tokens": T,
                        "results": {f"{fam}/{name}": v for (fam, name), v in result.items()}})
            for (fam, name), value in result.items():
                if fam == "base" or name.startswith("LoRA"):
                    continue
                eager = result.get((fam, "eager"))
                vs_eager = {mode: value[mode]["ms"] / eager[mode]["ms"] for mode in ("fwd", "fwd+bwd")}
                target = TARGETS.get(fam)
                target_text = (f"≤ {target[0]:.2f} / ≤ {target[1]:.2f}" if target else
                               f"≥ {SNELLA_TARGET} × LoRA thrpt")
                rows.append(f"| {fam} | {m}×{n} | {T} | {name} | {value['fwd']['ms']:.2f} | "
                            f"{value['fwd']['vs_base']:.3f} | {vs_eager['fwd']:.2f} | {value['fwd+bwd']['ms']:.2f} | "
                            f"{value['fwd+bwd']['vs_base']:.3f} | {vs_eager['fwd+bwd']:.2f} | {target_text} |")
                if fam == "snella":
                    lora = result[("snella", "LoRA r=32 (eager)")]
                    speed = {mode: lora[mode]["ms"] / value[mode]["ms"] for mode in ("fwd", "fwd+bwd")}
                    snella_rows.append(f"| {m}×{n} | {T} | {name} | {speed['fwd+bwd']:.2f} | {speed['fwd']:.2f} |")
            rows.append(f"| base | {m}×{n} | {T} | frozen x Wᵀ | {base['fwd']['ms']:.2f} | 1 | – | "
                        f"{base['fwd+bwd']['ms']:.2f} | 1 | – | – |")
    table = ("| family | out×in | T | path | fwd ms | fwd ÷ base | fwd ÷ eager | fwd+bwd ms | fwd+bwd ÷ base | "
             "fwd+bwd ÷ eager | target (fwd / fwd+bwd ÷ base) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    snella_table = ("| out×in | T | SNELLA path | throughput ÷ LoRA r=32, fwd+bwd | ÷ LoRA, fwd |\n"
                    "|---|---|---|---|---|\n"
                    + "\n".join(snella_rows))
    text = f"{header}\n{table}\n\n## SNELLA ÷ LoRA throughput (target ≥ {SNELLA_TARGET})\n\n{snella_table}\n"
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    stem = f"kernels_{'cuda' if on_gpu else 'cpu'}{'_quick' if args.quick else ''}"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"hardware": hardware, "dtype": str(dtype), "backend": backend, "rounds": rounds, "runs": raw}, indent=1))
    print(f"wrote {RESULTS / stem}.{{md,json}}")


if __name__ == "__main__":
    main()
