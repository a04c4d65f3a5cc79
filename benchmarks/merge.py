"""Peak memory and time of `specpeft merge` vs peft's load → merge_and_unload → save_pretrained on a ≥ 1 GB model.

    python benchmarks/merge.py           # 1.14 GB fp32 Llama-shaped model in 300 MB shards, 3 repeats (~4 min, 2 cores)
    python benchmarks/merge.py --quick   # 0.23 GB model in 80 MB shards, 1 repeat (< 1 min)

Setup: a randomly initialized LlamaForCausalLM (full: hidden 2048, intermediate 5632, 3 layers, vocab 32000, untied
head) saved with `save_pretrained(max_shard_size=...)`, and an SVFit adapter (r = 8, randomized SVD) on all seven
linear kinds of every block, its singular values perturbed. Each route runs in a fresh subprocess that first imports
torch, transformers, peft and specpeft; "baseline" is its VmRSS after those imports, "peak" its VmHWM at the end
(file pages mapped by safetensors count too). Routes:
    specpeft: `specpeft.merge.merge_adapter(base, adapter, out)` (streams one tensor at a time);
    peft:     `AutoModelForCausalLM.from_pretrained(base)` → `specpeft.load_adapter_model` → `merge_and_unload()` →
              `save_pretrained(out, max_shard_size=same)`.
Target (issue 8): peak − baseline of `specpeft merge` ≤ 1.1 × (largest shard + largest adapted weight in fp32).
Check: both routes write the same tensors (max |Δ| over all keys is reported). Everything is written under /tmp
and deleted afterwards. Results: benchmarks/results/merge{,_quick}.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Running a script puts its folder first on sys.path, where a benchmark file can shadow a package transformers
# probes at import (benchmarks/kernels.py once shadowed `kernels`). Import from the repository root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {  # name -> (hidden, intermediate, layers, vocab, shard)
    "full": (2048, 5632, 3, 32000, "300MB"),
    "quick": (1024, 2816, 2, 16000, "80MB"),
}


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (now) or VmHWM (peak of this process image).

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a worker started by a big parent would
    report the parent's size.
    """
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


# -- worker: one route in a fresh process ---------------------------------------------------------------------------


def worker(route: str, base: str, adapter: str, out: str, shard: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    import specpeft
    from specpeft.merge import merge_adapter

    torch.set_num_threads(2)
    baseline = _status_mib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    if route == "specpeft":
        merge_adapter(base, adapter, out, progress=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = specpeft.load_adapter_model(model, adapter).merge_and_unload()
        merged.save_pretrained(out, max_shard_size=shard)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_mib("VmHWM")
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "baseline_mib": baseline, "peak_mib": peak}))


# -- driver ---------------------------------------------------------------------------------------------------------


def build(workdir: Path, size: str) -> dict:
    """Save the base model and an SVFit adapter; return their sizes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    import specpeft

    hidden, inter, layers, vocab, shard = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(workdir / "base", max_shard_size=shard)
    adapter_config = specpeft.SVFitConfig(target_modules=TARGETS, r=8,
                                          svd=specpeft.SVDInit(kind="randomized", niter=1))
    peft_model = specpeft.get_adapter_model(model, adapter_config)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    peft_model.save_pretrained(workdir / "adapter")
    shards = sorted((workdir / "base").glob("*.safetensors"))
    largest_layer = max(m.weight.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS) * 4
    return {"model_bytes": sum(f.stat().st_size for f in shards), "shards": len(shards),
            "largest_shard_bytes": max(f.stat().st_size for f in shards), "largest_layer_fp32_bytes": largest_layer,
            "config": {"hidden": hidden, "intermediate": inter, "layers": layers, "vocab": vocab, "shard": shard}}


def run_route(route: str, workdir: Path, shard: str) -> dict:
    out = workdir / f"out_{route}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--worker", route, "--base", str(workdir / "base"), "--adapter",
               str(workdir / "adapter"), "--out", str(out), "--shard", shard]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{route} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_difference(a: Path, b: Path) -> float:
    """max |Δ| between the tensors of two model directories (keys must be the same)."""
    import torch
    from safetensors import safe_open

    def key_map(directory: Path) -> dict[str, Path]:
        index = directory / "model.safetensors.index.json"
        if index.exists():
            return {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(directory / "model.safetensors"), "pt") as fh:
            return {k: directory / "model.safetensors" for k in fh.keys()}

    left, right = key_map(a), key_map(b)
    if set(left) != set(right):
        raise RuntimeError(f"outputs hold different keys: {sorted(set(left) ^ set(right))[:5]}")
    worst = 0.0
    for key in left:
        with safe_open(str(left[key]), "pt") as fa, safe_open(str(right[key]), "pt") as fb:
            diff = (fa.get_tensor(key).double() - fb.get_tensor(key).double()).abs().max()
        worst = max(worst, float(diff))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.23 GB model, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="runs per route (default 3, quick 1)")
    parser.add_argument("--worker", choices=["specpeft", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.base, args.adapter, args.out, args.shard)
        return

    size = "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.quick else 3)
    load_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="specpeft_merge_bench_", dir="/tmp"))
    try:
        setup_start = time.perf_counter()
        info = build(workdir, size)
        info["setup_s"] = time.perf_counter() - setup_start
        runs: dict[str, list[dict]] = {"specpeft": [], "peft": []}
        for _ in range(repeats):  # interleaved, so machine-load drift hits both routes alike
            for route in runs:
                runs[route].append(run_route(route, workdir, SIZES[size][4]))
        info["max_abs_diff"] = max_difference(workdir / "out_specpeft", workdir / "out_peft")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = os.getloadavg()[0]

    mib = 2**20
    budget = 1.1 * (info["largest_shard_bytes"] + info["largest_layer_fp32_bytes"]) / mib
    rows = {}
    for route, samples in runs.items():
        rows[route] = {
            "wall_s": statistics.median(s["wall_s"] for s in samples),
            "cpu_s": statistics.median(s["cpu_s"] for s in samples),
            "peak_mib": max(s["peak_mib"] for s in samples),
            "baseline_mib": statistics.median(s["baseline_mib"] for s in samples),
        }
        rows[route]["increment_mib"] = max(s["peak_mib"] - s["baseline_mib"] for s in samples)
    ours, theirs = rows["specpeft"], rows["peft"]
    passed = ours["increment_mib"] <= budget
    import torch

    lines = [
        "# specpeft merge: streamed merge vs load + merge_and_unload + save_pretrained",
        "",
        f"`python benchmarks/merge.py{' --quick' if args.quick else ''}` — torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, 2 threads, {datetime.date.today()}, {repeats} run(s) per "
        f"route (time: median, memory: worst). Shared machine: load average {load_start:.1f} at start, "
        f"{load_end:.1f} at end on {os.cpu_count()} cores; CPU = process CPU time.",
        "",
        f"Model: Llama-shaped, hidden {info['config']['hidden']}, intermediate {info['config']['intermediate']}, "
        f"{info['config']['layers']} layers, vocab {info['config']['vocab']}, fp32, "
        f"{info['model_bytes'] / mib:.0f} MiB in {info['shards']} shards (largest {info['largest_shard_bytes'] / mib:.0f}"
        f" MiB); SVFit r=8 on {', '.join(TARGETS)}; largest adapted weight {info['largest_layer_fp32_bytes'] / mib:.0f}"
        " MiB in fp32.",
        "",
        "| route | wall s | CPU s | peak RSS MiB | after-import RSS MiB | peak − after-import MiB |",
        "|---|---|---|---|---|---|",
    ]
    for route, label in (("specpeft", "`specpeft merge` (streamed)"), ("peft", "load → merge_and_unload → save")):
        r = rows[route]
        lines.append(f"| {label} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mib']:.0f} | "
                     f"{r['baseline_mib']:.0f} | {r['increment_mib']:.0f} |")
    lines += [
        "",
        f"- Ratio specpeft ÷ peft route: wall {ours['wall_s'] / theirs['wall_s']:.2f}×, peak RSS "
        f"{ours['peak_mib'] / theirs['peak_mib']:.2f}×, working memory (peak − after-import) "
        f"{ours['increment_mib'] / theirs['increment_mib']:.3f}×.",
        f"- Target: peak − after-import ≤ 1.1 × (largest shard + largest layer) = {budget:.0f} MiB → "
        f"{ours['increment_mib']:.0f} MiB {'✅' if passed else '❌'}.",
        f"- Same output: max |Δ| between the two merged checkpoints = {info['max_abs_diff']:.3g}.",
        f"- Setup (random model + SVFit init + saves, not timed above): {info['setup_s']:.0f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stem = "merge_quick" if args.quick else "merge"
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    raw = {"setup": info, "routes": rows, "samples": runs, "budget_mib": budget, "target_met": passed,
           "load_average": [load_start, load_end], "torch": torch.__version__, "date": str(datetime.date.today())}
    (RESULTS / f"{stem}.json").write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    main()
