"""Two gloo processes train every registered method under DDP and FSDP2; rank 0 writes the comparison as JSON.

Run by tests/test_distributed.py in a subprocess (bounded by its timeout): `python distributed_worker.py OUT PORT`.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
WORLD = 2
STEPS = 2
LR = 0.05


def method_configs() -> dict:
    import specpeft
    from method_configs import small_config

    only = os.environ.get("SPECPEFT_DIST_METHODS")  # debugging aid: a comma-separated subset
    names = only.split(",") if only else specpeft.list_methods()
    return {name: small_config(name, ["lin0", "lin1"]) for name in names}


def batch(step: int) -> torch.Tensor:
    return torch.randn(8, 24, generator=torch.Generator().manual_seed(100 + step))


def train(model: torch.nn.Module, rank: int | None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    for step in range(STEPS):
        x = batch(step)
        if rank is not None:
            x = x.chunk(WORLD)[rank]  # equal halves: the mean of per-rank means is the global mean
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def adapter_state(state: dict) -> dict[str, torch.Tensor]:
    return {k.replace("module.", ""): v.detach().float().cpu() for k, v in state.items() if "_adapter." in k or "lora_" in k}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:4]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    import specpeft
    from adapter_matrix import MLP
    from specpeft.distributed import check_replicas_identical, gather_state_dict, save_adapter, shard_adapter_model

    results: dict[str, dict] = {}
    for name, config in method_configs().items():
        # Collectives run on every rank in the same order; an exception anywhere ends the whole spawn (no hang).
        def fresh():
            torch.manual_seed(0)
            return specpeft.get_adapter_model(MLP(), copy.deepcopy(config))

        single = fresh()
        train(single, None)
        ddp_model = fresh()
        check_replicas_identical(ddp_model)
        train(torch.nn.parallel.DistributedDataParallel(ddp_model), rank)
        fsdp_model = shard_adapter_model(fresh())
        train(fsdp_model, rank)
        gathered = gather_state_dict(fsdp_model)  # full tensors on rank 0 only
        path = os.path.join(out + ".adapters", name)
        save_adapter(fsdp_model, path)
        if rank == 0:
            reference = adapter_state(single.state_dict())
            torch.manual_seed(0)
            reloaded = specpeft.load_adapter_model(MLP(), path)
            x = batch(99)
            results[name] = {
                "ddp": max_diff(adapter_state(ddp_model.state_dict()), reference),
                "fsdp2": max_diff(adapter_state(gathered), reference),
                "reload_params_vs_sharded": max_diff(adapter_state(reloaded.state_dict()), adapter_state(gathered)),
                "reload_vs_single": float((reloaded(x) - single(x)).abs().max()),
            }
        dist.barrier()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[2]), sys.argv[1]), nprocs=WORLD)
