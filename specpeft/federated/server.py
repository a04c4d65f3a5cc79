"""Server side of federated LoRA: validation of client updates, weighted aggregation, FedSVD re-factorization.

Three protocols behind one interface (spec §2.3, §2.7), all over `LoRAState` dicts:

    FedAvg-LoRA:  A ← A + Σ_k w_k ΔA_k,  B ← B + Σ_k w_k ΔB_k           (clients train A and B)
    FFA-LoRA:     B ← B + Σ_k w_k ΔB_k,  A fixed forever                 (clients train B only)
    FedSVD:       B ← B + Σ_k w_k ΔB_k,  then every P rounds (A, B) ← refactorize(A, B)
                  (A ← top-r right singular vectors of BA, B ← U_r Σ_r; BA unchanged)

with w_k = |D_k| / Σ_{j accepted} |D_j| over the clients whose update passed validation. Updates are differences
from the broadcast state, so the weighted mean of the clients' factors equals the old factor plus the weighted
mean of the differences (the weights sum to 1).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from .refactor import RefactorMethod, refactorize
from .state import LoRAState, clone_state

__all__ = [
    "AggregationReport",
    "ClientUpdate",
    "FedAvgLoRAServer",
    "FedSVDServer",
    "FFALoRAServer",
    "LoRAServer",
    "Method",
    "Rejection",
    "make_server",
    "weighted_mean",
]

logger = logging.getLogger("specpeft.federated")

Method = Literal["fedsvd", "ffa", "fedavg"]
ClientId = Union[int, str]


@dataclass
class ClientUpdate:
    """What a client sends back after a round.

    Attributes:
        client_id: who sent it.
        num_examples: |D_k|, the aggregation weight's numerator.
        delta_B: per layer, B_k − B (m×r), B being the broadcast factor.
        delta_A: per layer, A_k − A (r×n); FedAvg-LoRA only (B-only protocols reject it).
        metrics: scalars the client reports (loss, ε, steps...).
    """

    client_id: ClientId
    num_examples: int
    delta_B: dict[str, Tensor]
    delta_A: Optional[dict[str, Tensor]] = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """A client update kept out of the average, and why."""

    client_id: ClientId
    reason: str


@dataclass
class AggregationReport:
    """One server step: who was averaged in with what weight, who was rejected, whether A was re-factorized."""

    round: int  # 1-based, as in `simulate` and Flower
    weights: dict[ClientId, float]
    rejected: list[Rejection]
    refactored: bool


def _check_deltas(deltas: Mapping[str, Tensor] | None, expected: dict[str, torch.Size], what: str) -> Optional[str]:
    if not isinstance(deltas, Mapping):
        return f"{what} is {type(deltas).__name__}, expected a dict of tensors keyed by layer"
    missing, extra = sorted(set(expected) - set(deltas)), sorted(set(deltas) - set(expected))
    if missing:
        return f"{what} lacks layers {missing[:3]}"
    if extra:
        return f"{what} has unknown layers {extra[:3]}"
    for key, shape in expected.items():
        delta = deltas[key]
        if not isinstance(delta, Tensor):
            return f"{what}['{key}'] is {type(delta).__name__}, not a tensor"
        if delta.shape != shape:
            return f"{what}['{key}'] has shape {tuple(delta.shape)}, expected {tuple(shape)}"
        if not torch.isfinite(delta).all():
            return f"{what}['{key}'] contains NaN or Inf"
    return None


def _weighted_step(x: Tensor, terms: list[tuple[float, Tensor]]) -> Tensor:
    """x + Σ_k w_k Δ_k, accumulated in fp32 at least (never in bf16/fp16), returned in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return (x.to(acc) + sum(w * delta.to(device=x.device, dtype=acc) for w, delta in terms)).to(x.dtype)


class LoRAServer:
    """FFA-LoRA, the B-only base protocol: average ΔB by dataset size; A never changes.

    Args:
        state: the initial global {layer: (A, B)}; copied, never aliased.
    """

    name: Method = "ffa"
    trains_A: bool = False

    def __init__(self, state: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        if not state:
            raise ValueError(f"{type(self).__name__}: the initial state is empty; pass {{layer: (A, B)}} for layers.")
        self.state: LoRAState = clone_state(state)
        self.round = 0  # aggregations done so far (the next one is round self.round + 1)
        self._shapes_A = {key: a.shape for key, (a, _) in self.state.items()}
        self._shapes_B = {key: b.shape for key, (_, b) in self.state.items()}

    def broadcast(self) -> LoRAState:
        """A copy of the global state for the clients of the next round (A and B: A may change every round)."""
        return clone_state(self.state)

    def validate(self, update: ClientUpdate) -> Optional[str]:
        """None when the update may be averaged in, otherwise the reason it may not."""
        n = update.num_examples
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            return f"num_examples={n!r} is not a positive integer"
        reason = _check_deltas(update.delta_B, self._shapes_B, "delta_B")
        if reason is not None:
            return reason
        if self.trains_A:
            return _check_deltas(update.delta_A, self._shapes_A, "delta_A")
        if update.delta_A is not None:
            return f"sent delta_A, but {self.name} clients train B only (A must stay frozen)"
        return None

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationReport:
        """Validate every update, average the accepted ones by |D_k| and advance one round.

        Rejected updates are logged and reported; they never touch the state. With no accepted update the
        factors are unchanged (the FedSVD schedule still runs, which leaves B·A unchanged).
        """
        accepted: list[ClientUpdate] = []
        rejected: list[Rejection] = []
        seen: set[ClientId] = set()
        for update in updates:
            reason = "sent a second update in the same round" if update.client_id in seen else self.validate(update)
            seen.add(update.client_id)
            if reason is None:
                accepted.append(update)
            else:
                rejected.append(Rejection(update.client_id, reason))
                logger.warning("round %d: rejected client %s's update: %s", self.round + 1, update.client_id, reason)
        total = sum(u.num_examples for u in accepted)
        weights = {u.client_id: u.num_examples / total for u in accepted}
        if accepted:
            self._apply(accepted, weights)
        self.round += 1
        refactored = self._after_round()
        return AggregationReport(self.round, weights, rejected, refactored)

    def _apply(self, accepted: list[ClientUpdate], weights: dict[ClientId, float]) -> None:
        for key, (a, b) in self.state.items():
            new_b = _weighted_step(b, [(weights[u.client_id], u.delta_B[key]) for u in accepted])
            new_a = a
            if self.trains_A:
                new_a = _weighted_step(a, [(weights[u.client_id], u.delta_A[key]) for u in accepted])
            self.state[key] = (new_a, new_b)

    def _after_round(self) -> bool:
        return False


FFALoRAServer = LoRAServer


class FedAvgLoRAServer(LoRAServer):
    """FedAvg-LoRA: clients train A and B; the server averages each factor separately (inexact for the product)."""

    name: Method = "fedavg"
    trains_A = True


class FedSVDServer(LoRAServer):
    """FedSVD: FFA-LoRA aggregation of B, then every `refactor_every` rounds re-factorize B·A by SVD.

    Args:
        state: the initial {layer: (A, B)}.
        refactor_every: P; re-factorize after round t when (t+1) % P == 0 and t+1 > svd_warmup (0 = never,
            which is FFA-LoRA).
        svd_warmup: rounds to wait before the first re-factorization.
        refactor_method: "qr" (O((m+n)r²), default) or "dense" (the reference code's m×n SVD).
    """

    name: Method = "fedsvd"

    def __init__(
        self,
        state: Mapping[str, tuple[Tensor, Tensor]],
        refactor_every: int = 1,
        svd_warmup: int = 0,
        refactor_method: RefactorMethod = "qr",
    ) -> None:
        super().__init__(state)
        if refactor_every < 0 or svd_warmup < 0:
            raise ValueError(
                f"FedSVDServer: refactor_every={refactor_every} and svd_warmup={svd_warmup} must be ≥ 0 "
                "(refactor_every=1 is the paper default; 0 turns FedSVD into FFA-LoRA)."
            )
        if refactor_method not in ("qr", "dense"):
            raise ValueError(f"FedSVDServer: refactor_method={refactor_method!r} must be 'qr' or 'dense'.")
        self.refactor_every = refactor_every
        self.svd_warmup = svd_warmup
        self.refactor_method = refactor_method

    def _after_round(self) -> bool:
        if self.refactor_every == 0 or self.round % self.refactor_every != 0 or self.round <= self.svd_warmup:
            return False
        for key, (a, b) in self.state.items():
            self.state[key] = refactorize(a, b, self.refactor_method)
        return True


def make_server(method: Method, state: Mapping[str, tuple[Tensor, Tensor]], **kwargs: object) -> LoRAServer:
    """The server of a protocol: "fedsvd" (kwargs: refactor_every, svd_warmup, refactor_method), "ffa" or "fedavg"."""
    if method == "fedsvd":
        return FedSVDServer(state, **kwargs)  # type: ignore[arg-type]
    if kwargs:
        raise TypeError(f"make_server('{method}'): unexpected options {sorted(kwargs)}; only 'fedsvd' takes options.")
    if method == "ffa":
        return FFALoRAServer(state)
    if method == "fedavg":
        return FedAvgLoRAServer(state)
    raise ValueError(f"make_server: method={method!r} is not one of 'fedsvd', 'ffa', 'fedavg'.")


def weighted_mean(values: Mapping[ClientId, float], weights: Mapping[ClientId, float]) -> float:
    """Σ_k w_k v_k over the clients in `weights` that reported a finite value (NaN when none did)."""
    pairs = [(weights[k], v) for k, v in values.items() if k in weights and math.isfinite(v)]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else float("nan")
