"""TeRA's networks of a whole forward pass as one autograd node per bucket.

Every layer turns its diagonals into Kronecker factors (A, B) (adapters/tera_network.py), about 20 forward and 30
backward ops of tiny tensors per layer and step: host time, which the per-layer GEMMs of small batches, and any GPU,
wait for. Layers of one bucket share the frozen core and factors, so at the start of a model's forward pass
(`network_pass`, entered by the tuner around every forward and generate) the factors of all of them are formed by one
`KroneckerNetworkFunction` node with a leading layer axis, and each layer picks up its own (`pass_factors`). The node
is built before any layer runs, so it lies outside every activation-checkpointed region, and a layer whose output
goes unused leaves its diagonals without a gradient (None, not zeros), as its own node would.

Outside a pass a layer forms its own network (the inner model called directly), except when activation checkpointing
recomputes it in backward: non-reentrant checkpointing requires the recomputation to save exactly the tensors of the
forward, which used the pass's factors, so a layer re-run during a backward takes them again as long as its diagonals
are the same tensors at the same version. The pass node keeps its intermediates (`rerunnable`): reentrant checkpointing
back-propagates it once per recomputed block and once more for the layers outside any. Batched and per-layer networks
give the same values up to the order of the batched GEMMs' sums.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .tera_network import kronecker_networks

if TYPE_CHECKING:
    from .tera import TeRAAdapter

_PASS: ContextVar[Optional[object]] = ContextVar("specpeft_tera_pass", default=None)  # the pass in progress


@dataclass
class PassFactors:
    """One layer's (A, B) from a pass node, and the diagonals it was formed from with their versions then."""

    pair: tuple[Tensor, Tensor]
    token: object  # the pass that formed it
    vectors: tuple[Tensor, ...]
    versions: tuple[int, ...]

    def unchanged(self, vectors: list[Tensor]) -> bool:
        return len(vectors) == len(self.vectors) and all(
            v is w and v._version == version for v, w, version in zip(vectors, self.vectors, self.versions))


# adapter -> its factors from the last pass; outside the modules, so deepcopy and pickling never meet graph tensors
_FORMED: weakref.WeakKeyDictionary[TeRAAdapter, PassFactors] = weakref.WeakKeyDictionary()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # what torch.utils.checkpoint itself reads


def _eligible(adapter: TeRAAdapter) -> bool:
    """The layer may call `_kronecker_factors` (its Kronecker paths) and its diagonals can be stacked: whole, ordinary
    tensors (an FSDP shard, resized to 0 or flattened, or a DTensor stays per layer)."""
    if not (adapter.edge_kronecker or adapter.kronecker_capable):
        return False
    shape = adapter.shape
    sizes = {"both": [*shape.mode_sizes, *shape.ranks], "mode": list(shape.mode_sizes), "rank": list(shape.ranks)}
    return all(type(vector) in (nn.Parameter, Tensor) and vector.shape == (size,)
               for vector, size in zip(adapter.vectors(), sizes[adapter.scale_sides]))


def batched_factors(adapters: Iterable[TeRAAdapter], token: object) -> int:
    """Forms (A, B) of every eligible adapter, one `kronecker_networks` node per group of layers that share a bucket
    tensor, α, scaled sides, device and dtype, and leaves it on the adapter (`PassFactors`); returns the node count."""
    groups: dict[tuple, list[TeRAAdapter]] = defaultdict(list)
    for adapter in adapters:
        if _eligible(adapter):
            first = adapter.vectors()[0]
            key = (id(adapter.shared_buffer), adapter.alpha, adapter.scale_sides, first.device, first.dtype)
            groups[key].append(adapter)
    for members in groups.values():
        lead = members[0]
        core, factors = lead._shared_views()
        layers = [member._diagonals(member.vectors()) for member in members]
        pairs = kronecker_networks(lead.shape, core, factors, layers, alpha=lead.alpha, rerunnable=True)
        for member, pair in zip(members, pairs):
            vectors = tuple(member.vectors())
            _FORMED[member] = PassFactors(pair, token, vectors, tuple(v._version for v in vectors))
    return len(groups)


@contextmanager
def network_pass(adapters: Iterable[TeRAAdapter]) -> Iterator[None]:
    """One forward pass of a model: the eligible adapters' factors are formed here, batched, and served by
    `pass_factors`. Nested passes (a task model's forward calling the tuner's) reuse the outer one; under
    torch.compile the layers form their own (traced) networks."""
    if torch.compiler.is_compiling() or _PASS.get() is not None:  # is_compiling first: dynamo cannot trace a ContextVar
        yield
        return
    token = object()
    batched_factors(adapters, token)
    reset = _PASS.set(token)
    try:
        yield
    finally:
        _PASS.reset(reset)


def pass_factors(adapter: TeRAAdapter) -> Optional[tuple[Tensor, Tensor]]:
    """This adapter's (A, B) from the pass in progress, or from the last pass when recomputed in backward (module
    docstring); None otherwise, under torch.compile, or when they were formed without autograd and this layer now
    needs it (grad re-enabled inside a no_grad forward)."""
    if torch.compiler.is_compiling():
        return None
    formed = _FORMED.get(adapter)
    if formed is None:
        return None
    current = _PASS.get()
    vectors = adapter.vectors()
    if not (formed.token is current if current is not None else
            _in_backward() and formed.unchanged(vectors)):
        return None
    if torch.is_grad_enabled() and not formed.pair[0].requires_grad and any(v.requires_grad for v in vectors):
        return None
    return formed.pair
