"""TeRA's networks of a whole forward pass as one autograd node per bucket.

Every layer turns its diagonals into Kronecker factors (A, B) (adapters/tera_network.py), about 60 aten ops of tiny
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .tera_network import kronecker_networks

if TYPE_CHECKING:
    from .tera import TeRAAdapter

Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Formed:
    """A layer's (A, B) from a pass node, with the diagonals it was formed from and their versions then."""

    pair: Pair
    vectors: tuple[Tensor, ...]
    versions: tuple[int, ...]

    def current(self, vectors: Sequence[Tensor]) -> bool:
        """The layer still holds the same tensors, unmodified: not swapped for gathered shards by FSDP (use_orig_params),
        moved or changed in place by a hook between the pass's start and the layer's call."""
        first = self.pair[0]  # formed on the diagonals' device and dtype: `.to()` keeps the objects, changes these
        return len(vectors) == len(self.vectors) and vectors[0].device == first.device and \
            vectors[0].dtype == first.dtype and all(
                v is w and v._version == version for v, w, version in zip(vectors, self.vectors, self.versions))


# the pass in progress in this thread / context: adapter -> its factors, or None when it takes no part; None outside
_PASS: ContextVar[Optional[dict[TeRAAdapter, Optional[Formed]]]] = ContextVar("specpeft_tera_pass", default=None)


def _eligible(adapter: TeRAAdapter, vectors: list[Tensor]) -> bool:
    """`TeRAConfig.batch_networks` is on, some token count runs a path that reads the factors, and the diagonals can
    be stacked: whole, ordinary tensors on the bucket's device (an FSDP shard, resized to 0 or flattened, a DTensor
    or an offloaded meta tensor stays per layer)."""
    if not (adapter.batch_networks and adapter.may_use_kronecker_factors()):
        return False
    device = adapter.shared_buffer.device
    return all(type(vector) in (nn.Parameter, Tensor) and vector.shape == (size,) and vector.device == device
               for vector, size in zip(vectors, adapter.vector_sizes))


def batched_factors(adapters: Iterable[TeRAAdapter]) -> dict[TeRAAdapter, Optional[Formed]]:
    """The factors of every eligible adapter (None for the others), one `kronecker_networks` node per group of layers
    that share a bucket tensor, α, scaled sides, dtype and whether they train (a frozen layer's factors must not
    require grad)."""
    table: dict[TeRAAdapter, Optional[Formed]] = {}
    groups: dict[tuple, list[tuple[TeRAAdapter, list[Tensor]]]] = defaultdict(list)
    for adapter in adapters:
        table[adapter] = None
        vectors = adapter.vectors()
        if _eligible(adapter, vectors):
            trains = any(vector.requires_grad for vector in vectors)
            key = (id(adapter.shared_buffer), adapter.alpha, adapter.scale_sides, vectors[0].dtype, trains)
            groups[key].append((adapter, vectors))
    for members in groups.values():
        lead = members[0][0]
        core, factors = lead._shared_views()
        layers = [adapter._diagonals(vectors) for adapter, vectors in members]
        pairs = kronecker_networks(lead.shape, core, factors, layers, alpha=lead.alpha)
        for (adapter, vectors), pair in zip(members, pairs):
            table[adapter] = Formed(pair, tuple(vectors), tuple(vector._version for vector in vectors))
    return table


@contextmanager
def network_pass(adapters: Iterable[TeRAAdapter]) -> Iterator[None]:
    """One forward pass of a model: the eligible adapters' factors are formed here, batched, and served by
    `pass_factors` until it ends. A pass entered inside another (a task model's forward around the tuner's, a second
    adapted model) adds the adapters the outer one has not seen; under torch.compile the layers form their own
    (traced) networks."""
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
    """This adapter's (A, B) from the pass in progress, or None: no pass, not eligible, traced by torch.compile, its
    diagonals replaced, moved or modified since the pass began (`Formed.current`), or formed without autograd while
    this layer needs it (grad re-enabled inside a no_grad forward)."""
    if torch.compiler.is_compiling():
        return None
    table = _PASS.get()
    formed = None if table is None else table.get(adapter)
    if formed is None:
        return None
    vectors = adapter.vectors()
    if not formed.current(vectors):
        return None
    if torch.is_grad_enabled() and not formed.pair[0].requires_grad and any(v.requires_grad for v in vectors):
        return None
    return formed.pair
