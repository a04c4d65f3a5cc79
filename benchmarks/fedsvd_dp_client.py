"""FedSVD client step: DP-SGD (Opacus) time and memory ÷ the non-private step, on a real encoder.

    python benchmarks/fedsvd_dp_client.py            # MiniLM-L6, LoRA r=8 on query/value, batch 32, seq 64
    python benchmarks/fedsvd_dp_client.py --quick    # batch 16, seq 32 (~2 CPU minutes)

Both modes run `specpeft.federated.train_client` on MiniLM-L6 (BertForSequenceClassification) with FedSVD's LoRA
(A frozen, B trained) on Rotten Tomatoes snippets padded to a fixed length. The DP mode is Opacus DP-SGD (hooks
per-sample gradients of B, flat clipping, Gaussian noise, Poisson batches of expected size `batch`); the plain
mode is SGD on shuffled batches. Time: `seconds_per_step` / `cpu_seconds_per_step` reported by `train_client`
(the optimization loop only: no Opacus set-up, no accounting), median over --repeats rounds of --steps steps, the
two modes interleaved in one process. Memory: each mode in its own subprocess; resident-set size is sampled every
2 ms during a round (after a warm-up round) and the peak minus the RSS just before the round is reported.
Results: benchmarks/results/fedsvd_dp_client{,_quick}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
import assets  # noqa: E402

import specpeft  # noqa: E402
from specpeft.federated import (  # noqa: E402
    ClientPrivacy,
    DPConfig,
    LocalTraining,
    find_lora_factors,
    read_state,
    train_client,
)

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def setup(batch: int, seq: int, rank: int, n_data: int):
    data = assets.rotten_tomatoes(n_train=n_data, n_test=1)
    base, tokenizer = assets.minilm_classifier(num_labels=2, seed=0)
    config = specpeft.FedSVDConfig(r=rank, lora_alpha=rank, target_modules=["query", "value"])
    model = specpeft.get_adapter_model(base, config)
    enc = tokenizer(data.train_text, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    dataset = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(data.train_labels))
    factors = find_lora_factors(model)
    return model, factors, read_state(factors), dataset


def loss_fn(model, batch) -> torch.Tensor:
    ids, mask, labels = batch
    return torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)


def run_round(model, factors, state, dataset, mode: str, steps: int, batch: int, seed: int) -> dict:
    privacy = None
    if mode == "dp":  # σ fixed: calibration is a one-off per client, not part of a step
        dp = DPConfig(noise_multiplier=1.0, max_grad_norm=2.0, accountant="rdp")
        privacy = ClientPrivacy(dp, len(dataset), batch, steps)
    update = train_client(model, factors, state, dataset, loss_fn, LocalTraining(steps=steps, batch_size=batch, lr=0.1),
                          privacy=privacy, seed=seed)
    return update.metrics


def child_memory(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, factors, state, dataset = setup(args.batch, args.seq, args.rank, args.n_data)
    run_round(model, factors, state, dataset, args.child, 1, args.batch, seed=0)  # warm-up
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    before = rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run_round(model, factors, state, dataset, args.child, args.steps, args.batch, seed=1)
    stop.set()
    thread.join()
    print(json.dumps({"rss_before_mb": before / 2**20, "peak_delta_mb": (max(peak[0], rss_bytes()) - before) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="steps per measured round")
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds per mode")
    parser.add_argument("--n-data", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["plain", "dp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    args.batch = args.batch or (16 if args.quick else 32)
    args.seq = args.seq or (32 if args.quick else 64)
    args.steps = args.steps or 3
    args.repeats = args.repeats or 3
    if args.child:
        child_memory(args)
        return

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    model, factors, state, dataset = setup(args.batch, args.seq, args.rank, args.n_data)
    timings: dict[str, list[dict]] = {"plain": [], "dp": []}
    for mode in ("plain", "dp"):
        run_round(model, factors, state, dataset, mode, 1, args.batch, seed=0)  # warm-up
    for repeat in range(args.repeats):
        for mode in ("plain", "dp"):  # interleaved, so both modes see the same machine load
            timings[mode].append(run_round(model, factors, state, dataset, mode, args.steps, args.batch, seed=repeat))
        steps = ", ".join(f"{m} {timings[m][-1]['seconds_per_step']:.3f} s/step" for m in timings)
        print(f"repeat {repeat}: {steps}", flush=True)

    memory = {}
    for mode in ("plain", "dp"):
        cmd = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch), "--seq", str(args.seq),
               "--rank", str(args.rank), "--steps", str(args.steps), "--n-data", str(args.n_data),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[mode] = json.loads(out.strip().splitlines()[-1])

    row = {mode: {
        "wall_s_per_step": statistics.median(t["seconds_per_step"] for t in timings[mode]),
        "cpu_s_per_step": statistics.median(t["cpu_seconds_per_step"] for t in timings[mode]),
        "wall_all": [t["seconds_per_step"] for t in timings[mode]],
        **memory[mode],
    } for mode in ("plain", "dp")}
    ratios = {
        "wall": row["dp"]["wall_s_per_step"] / row["plain"]["wall_s_per_step"],
        "cpu": row["dp"]["cpu_s_per_step"] / row["plain"]["cpu_s_per_step"],
        "memory": row["dp"]["peak_delta_mb"] / row["plain"]["peak_delta_mb"],
    }
    trainable = sum(b.numel() for _, b in factors.values())
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "torch": torch.__version__, "threads": args.threads, "batch": args.batch, "seq": args.seq, "rank": args.rank,
        "steps": args.steps, "repeats": args.repeats, "trainable_B": trainable, "date": time.strftime("%Y-%m-%d"),
        "loadavg": load, "loadavg_end": os.getloadavg(),
    }
    lines = [
        "# FedSVD client step: DP-SGD (Opacus) ÷ non-private",
        "",
        f"`{meta['command']}` — MiniLM-L6 (BertForSequenceClassification), FedSVD LoRA r={args.rank} on query/value "
        f"({trainable:,} trainable B entries), batch {args.batch} (DP: expected Poisson batch), seq {args.seq}, torch "
        f"{meta['torch']}, {args.threads} threads; median of {args.repeats} rounds × {args.steps} steps, modes "
        f"interleaved; memory = peak RSS during a round minus RSS before it, each mode in its own process. "
        f"{meta['date']}; shared machine, load average {load[0]:.1f} at start, {meta['loadavg_end'][0]:.1f} at end "
        f"on {os.cpu_count()} cores.",
        "",
        "| mode | wall s/step | CPU s/step | peak memory over baseline (MiB) | process RSS before (MiB) |",
        "|---|---|---|---|---|",
    ]
    for mode in ("plain", "dp"):
        r = row[mode]
        lines.append(f"| {'non-private SGD' if mode == 'plain' else 'DP-SGD (Opacus)'} | {r['wall_s_per_step']:.3f} "
                     f"| {r['cpu_s_per_step']:.3f} | {r['peak_delta_mb']:.1f} | {r['rss_before_mb']:.0f} |")
    lines.append(f"| **DP ÷ non-private** | **{ratios['wall']:.2f}×** | **{ratios['cpu']:.2f}×** "
                 f"| **{ratios['memory']:.2f}×** | |")
    table = "\n".join(lines) + "\n"
    stem = "fedsvd_dp_client_quick" if args.quick else "fedsvd_dp_client"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": row, "ratios": ratios}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
