"""TeRA's networks of a whole forward pass as one autograd node per bucket.

Every layer turns its diagonals into Kronecker factors (A, B) (adapters/tera_network.py), about 50 aten ops of tiny
tensors per layer and step: host time, which the per-layer GEMMs of small batches, and any GPU, wait for. Layers of
one bucket share the frozen core and factors, so at the start of a model's forward pass (`network_pass`, entered by
the tuner around every forward and generate) the factors of all of them are formed by one `KroneckerNetworkFunction`
node with a leading layer axis, and each layer picks up its own (`pass_factors`) until the pass ends.

A layer outside a pass forms its own network: the inner model called directly, torch.compile (which traces each
layer's network), and the recomputation of activation checkpointing, which runs in backward. The network node keeps
its intermediates out of checkpointing's sight, so a recomputed layer saves the same tensors whichever node made its
factors; the values agree up to the order of the batched GEMMs' sums. The pass node is built before any layer runs,
outside every checkpointed region, and a layer whose output goes unused leaves its diagonals without a gradient
(None, not zeros), as its own node would.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .tera_network import kronecker_networks

if TYPE_CHECKING:
    from .tera import TeRAAdapter

Pair = tuple[Tensor, Tensor]
# the pass in progress in this thread / context: adapter -> its (A, B); None outside a pass
_PASS: ContextVar[Optional[dict[TeRAAdapter, Pair]]] = ContextVar("specpeft_tera_pass", default=None)


def _eligible(adapter: TeRAAdapter) -> bool:
    """`TeRAConfig.batch_networks` is on, some token count runs a path that reads the factors, and the diagonals can
    be stacked: whole, ordinary tensors (an FSDP shard, resized to 0 or flattened, or a DTensor stays per layer)."""
    if not (adapter.batch_networks and adapter.may_use_kronecker_factors()):
        return False
    shape = adapter.shape
    sizes = {"both": (*shape.mode_sizes, *shape.ranks), "mode": shape.mode_sizes, "rank": shape.ranks}
    return all(type(vector) in (nn.Parameter, Tensor) and vector.shape == (size,)
               for vector, size in zip(adapter.vectors(), sizes[adapter.scale_sides]))


def batched_factors(adapters: Iterable[TeRAAdapter]) -> dict[TeRAAdapter, Pair]:
    """(A, B) of every eligible adapter, one `kronecker_networks` node per group of layers that share a bucket tensor,
    α, scaled sides, device, dtype and whether they train (a frozen layer's factors must not require grad)."""
    groups: dict[tuple, list[TeRAAdapter]] = defaultdict(list)
    for adapter in adapters:
        if _eligible(adapter):
            vectors = adapter.vectors()
            trains = any(vector.requires_grad for vector in vectors)
            key = (id(adapter.shared_buffer), adapter.alpha, adapter.scale_sides, vectors[0].device, vectors[0].dtype,
                   trains)
            groups[key].append(adapter)
    table: dict[TeRAAdapter, Pair] = {}
    for members in groups.values():
        lead = members[0]
        core, factors = lead._shared_views()
        layers = [member._diagonals(member.vectors()) for member in members]
        table.update(zip(members, kronecker_networks(lead.shape, core, factors, layers, alpha=lead.alpha)))
    return table


@contextmanager
def network_pass(adapters: Iterable[TeRAAdapter]) -> Iterator[None]:
    """One forward pass of a model: the eligible adapters' factors are formed here, batched, and served by
    `pass_factors` until it ends. A pass entered inside another (a task model's forward around the tuner's, a second
    adapted model) adds what the outer one lacks; under torch.compile the layers form their own (traced) networks."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace a ContextVar
        yield
        return
    table = _PASS.get()
    if table is not None:
        table.update(batched_factors(adapter for adapter in adapters if adapter not in table))
        yield
        return
    reset = _PASS.set(batched_factors(adapters))
    try:
        yield
    finally:
        _PASS.reset(reset)


def pass_factors(adapter: TeRAAdapter) -> Optional[Pair]:
    """This adapter's (A, B) from the pass in progress, or None: no pass, not eligible, traced by torch.compile, or
    formed without autograd while this layer needs it (grad re-enabled inside a no_grad forward)."""
    if torch.compiler.is_compiling():
        return None
    table = _PASS.get()
    pair = None if table is None else table.get(adapter)
    if pair is not None and torch.is_grad_enabled() and not pair[0].requires_grad:
        if any(vector.requires_grad for vector in adapter.vectors()):
            return None
    return pair
