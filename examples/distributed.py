"""Data-parallel fine-tuning with any specpeft method under DDP or FSDP2, launched by torchrun or accelerate.

    torchrun --standalone --nproc_per_node=2 examples/distributed.py --method soka --mode fsdp2
    accelerate launch --num_processes 2 --cpu examples/distributed.py --method svfit --mode ddp

MiniLM-L6 on Rotten Tomatoes (offline). Every rank builds the same adapter (initializers are deterministic, checked
with `check_replicas_identical`), trains on its shard of each global batch, and rank 0 saves the adapter, gathered
from the shards under FSDP2. Uses gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import assets  # noqa: E402
from method_configs import small_config  # noqa: E402

import specpeft  # noqa: E402
from specpeft.distributed import check_replicas_identical, save_adapter, shard_adapter_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="svfit", choices=specpeft.list_methods())
    parser.add_argument("--mode", default="ddp", choices=["ddp", "fsdp2"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default="out/distributed")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the {world} processes")

    base, tokenizer = assets.minilm_classifier(num_labels=2, seed=0)
    config = small_config(args.method, ["query", "value"])
    config.modules_to_save = ["classifier"]
    model = specpeft.get_adapter_model(base, config).to(device)  # initializers run before any wrapping
    check_replicas_identical(model)
    if args.mode == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    else:
        trained = shard_adapter_model(model)

    data = assets.rotten_tomatoes(n_train=args.steps * args.global_batch, n_test=10)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    local = args.global_batch // world
    for step in range(args.steps):
        start = step * args.global_batch + rank * local  # this rank's shard of the global batch
        texts = data.train_text[start : start + local]
        labels = torch.tensor(data.train_labels[start : start + local], device=device)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(device)
        loss = torch.nn.functional.cross_entropy(trained(**enc).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % 5 == 0:
            print(f"[{args.method}/{args.mode}] step {step:3d} loss {loss.item():.4f}", flush=True)

    path = os.path.join(args.out, f"{args.method}_{args.mode}")
    save_adapter(trained, path)
    if rank == 0:
        print(f"saved adapter from rank 0 to {path}: {sorted(os.listdir(path))}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
