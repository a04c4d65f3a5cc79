"""Scale-out helpers: FSDP2 sharding of an adapter model and gathering its adapter for `save_pretrained`.

DDP needs nothing from us: wrap the PeftModel in `DistributedDataParallel` as usual (adapters hold no shared
`nn.Parameter`; shared frozen state is buffers). Initializers (SVD, KPSVD) are deterministic — fp32 on the same
weights with seeded sketches — so every rank builds identical adapters before wrapping; `check_replicas_identical`
verifies that cheaply.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._peft_compat import BaseTunerLayer


def shard_adapter_model(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """Apply FSDP2 `fully_shard` to every adapted layer, then to the root.

    One FSDP unit per adapted layer keeps its frozen base weight and its trainables together (FSDP2 allows mixed
    `requires_grad` in a unit). Run initializers first: call this after `get_adapter_model`.

    Raises:
        ValueError: a method whose adapter declares `fsdp_supported = False` (with its reason).
    """
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        for adapter in getattr(layer, "adapters", {}).values():
            if not getattr(adapter, "fsdp_supported", True):
                raise ValueError(
                    f"{type(adapter).__name__} on '{getattr(layer, 'key', '?')}' cannot be sharded with FSDP2: "
                    f"{getattr(adapter, 'fsdp_unsupported_reason', 'unsupported')}. Use DistributedDataParallel."
                )
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict, gathered to CPU on rank 0 (other ranks get {}); every rank must call it.

    Pass it to `save_pretrained(..., state_dict=...)` on rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the adapter of a DDP-, FSDP2- or un-wrapped PeftModel from rank 0 (every rank must call it)."""
    peft_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    sharded = any(hasattr(p, "full_tensor") for p in peft_model.parameters())
    state_dict = gather_state_dict(peft_model) if sharded else None
    if not dist.is_initialized() or dist.get_rank() == 0:
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        peft_model.save_pretrained(os.fspath(path), **kwargs)
    if dist.is_initialized():
        dist.barrier()


def check_replicas_identical(model: nn.Module) -> None:
    """Raise if any adapter tensor differs across ranks (e.g. a non-deterministic init); a no-op without dist."""
    if not dist.is_initialized():
        return
    for name, tensor in model.state_dict().items():
        if not any(tag in name for tag in ("_adapter.", "lora_")):
            continue
        local = tensor.detach().float()
        reference = local.clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(local, reference):
            raise RuntimeError(f"Adapter tensor '{name}' differs between rank {dist.get_rank()} and rank 0.")
