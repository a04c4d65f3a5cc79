"""LoRA factor state dicts, the currency of the federated core: {layer key: (A (r×n), B (m×r))}.

The core never imports peft. A model is bound to a state through `find_lora_factors`, which finds the
`lora_A[adapter]` / `lora_B[adapter]` sub-modules that peft's LoRA (and any hand-written module with the same
attribute names) holds. Conv LoRA factors are viewed as matrices: A (r, in/groups, *k) → (r, in/groups·Πk) and
B (m, r, 1, …) → (m, r), the layout in which Δ = s·B·A is a matrix product.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["LoRAFactors", "LoRAState", "clone_state", "find_lora_factors", "read_state", "write_state"]

LoRAState = dict[str, tuple[Tensor, Tensor]]  # layer key -> (A (r, n), B (m, r))
LoRAFactors = dict[str, tuple[nn.Parameter, nn.Parameter]]  # layer key -> (A weight, B weight) of a live model

_PEFT_PREFIX = "base_model.model."


def find_lora_factors(model: nn.Module, adapter_name: str = "default") -> LoRAFactors:
    """The (lora_A, lora_B) weight parameters of every LoRA layer of `adapter_name`, keyed by module name.

    Raises:
        ValueError: no LoRA layer holds `adapter_name`, or the adapter also has embedding LoRA factors or a grouped
            convolution (their Δ is not B·A; leave them out of `target_modules`).
    """
    factors: LoRAFactors = {}
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        embedding_a = getattr(module, "lora_embedding_A", None)
        if isinstance(embedding_a, (Mapping, nn.ParameterDict)) and adapter_name in embedding_a:  # peft: the latter
            raise ValueError(
                f"find_lora_factors: layer '{name}' is an embedding LoRA; the federated core handles Linear/Conv "
                "LoRA only. Remove embeddings from target_modules."
            )
        if isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict) and adapter_name in lora_a:
            weight_a, weight_b = lora_a[adapter_name].weight, lora_b[adapter_name].weight
            if weight_b.shape[1] != weight_a.shape[0]:  # B (m, r/groups, *1): a grouped conv's block-diagonal Δ
                raise ValueError(
                    f"find_lora_factors: layer '{name}' is a grouped convolution (lora_B reads {weight_b.shape[1]} of "
                    f"A's {weight_a.shape[0]} channels), so Δ is not the product B·A the federated core averages and "
                    "re-factorizes. Leave it out of target_modules (exclude_modules)."
                )
            key = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
            factors[key] = (weight_a, weight_b)
    if not factors:
        raise ValueError(
            f"find_lora_factors: {type(model).__name__} has no LoRA layer with adapter '{adapter_name}'. Wrap it "
            "with specpeft.get_adapter_model(model, FedSVDConfig(...)) or pass the adapter name it was created with."
        )
    return factors


def _as_matrices(weight_a: Tensor, weight_b: Tensor) -> tuple[Tensor, Tensor]:
    rank = weight_a.shape[0]
    # (r, in, *k) -> (r, in·Πk);  (m, r, *1) -> (m, r)
    return weight_a.reshape(rank, -1), weight_b.reshape(weight_b.shape[0], rank)


def read_state(factors: LoRAFactors) -> LoRAState:
    """Detached copies of every layer's (A, B) as matrices."""
    with torch.no_grad():
        return {key: tuple(t.detach().clone() for t in _as_matrices(a, b)) for key, (a, b) in factors.items()}


def write_state(factors: LoRAFactors, state: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """Copy a state into the model's factors in place (dtype/device follow the model).

    Raises:
        KeyError / ValueError: a layer is missing from the state, or a matrix has the wrong shape.
    """
    missing = sorted(set(factors) - set(state))
    if missing:
        raise KeyError(f"write_state: the state lacks layers {missing[:5]}; it was built for another model.")
    with torch.no_grad():
        for key, (weight_a, weight_b) in factors.items():
            new_a, new_b = state[key]
            want_a, want_b = _as_matrices(weight_a, weight_b)
            if new_a.shape != want_a.shape or new_b.shape != want_b.shape:
                raise ValueError(
                    f"write_state: layer '{key}' expects A {tuple(want_a.shape)} and B {tuple(want_b.shape)}, got "
                    f"A {tuple(new_a.shape)} and B {tuple(new_b.shape)}."
                )
            weight_a.copy_(new_a.reshape(weight_a.shape))  # matrix -> the module's (conv) layout
            weight_b.copy_(new_b.reshape(weight_b.shape))


def clone_state(state: Mapping[str, tuple[Tensor, Tensor]]) -> LoRAState:
    """Deep copy of a state (what a broadcast sends)."""
    return {key: (a.detach().clone(), b.detach().clone()) for key, (a, b) in state.items()}
