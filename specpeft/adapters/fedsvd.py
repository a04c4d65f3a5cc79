"""FedSVD's adapter: stock peft LoRA with A frozen (orthonormal rows) and B trained (arXiv 2505.12805).

    Δ = s·B A,   s = lora_alpha / r,   A ∈ R^{r×n} frozen with A Aᵀ = I_r,   B ∈ R^{m×r} trained,   B₀ = 0.

We do not rewrite LoRA (design.md §2): `get_adapter_model(model, FedSVDConfig(...))` builds a peft LoRA, replaces
peft's Kaiming A by seeded random orthonormal rows (so ‖ξ_B A‖_F = ‖ξ_B‖_F from round one, spec §2.4),
keeps B = 0 (the output at init is the base output, exactly) and registers `lora_A` in the layer's
`frozen_peft_weight_names`, which peft re-applies after every `set_adapter` / `enable_adapters`. Saved adapters are
plain LoRA files that stock `peft.PeftModel.from_pretrained` loads. The federated protocol (server
re-factorization, DP clients) lives in `specpeft.federated` and works on the (A, B) tensors only.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from .._peft_compat import BaseTunerLayer, LoraConfig, PeftModel, get_peft_model
from .rollback import rollback_on_failure

__all__ = [
    "FedSVDConfig",
    "add_fedsvd_adapter",
    "build_fedsvd_model",
    "freeze_lora_A",
    "load_fedsvd_model",
    "orthonormal_rows",
]

if not hasattr(BaseTunerLayer, "frozen_peft_weight_names"):  # pragma: no cover - guarded by _peft_compat's range
    raise ImportError("specpeft.adapters.fedsvd needs peft's BaseTunerLayer.frozen_peft_weight_names (peft >= 0.21).")


@dataclass
class FedSVDConfig:
    """FedSVD options; everything else is peft's LoRA (reference defaults: r=8, lora_alpha=8, query/value).

    Attributes:
        r: LoRA rank; each adapted layer needs r ≤ its input width (A has r orthonormal rows).
        lora_alpha: scaling numerator, s = lora_alpha / r.
        rank_pattern, alpha_pattern: per-module r and lora_alpha (peft's keys: name suffix or regex). A layer
            with r = its input width n gets a full orthonormal basis A, so B·A is an unrestricted update of that
            layer: the way to train a new classification head in every protocol while the federated core only
            moves LoRA factors.
        target_modules: as in peft (names, suffixes, a regex, "all-linear"); None uses peft's per-model default.
        exclude_modules, layers_to_transform, layers_pattern, bias, modules_to_save, task_type: passed to
            `peft.LoraConfig` unchanged. The federated core trains and averages the LoRA factors only; modules
            in `modules_to_save` stay frozen during federated rounds.
        lora_dropout: dropout on the adapter input (reference 0.05).
        init_A: "orthonormal" (default: Haar-random orthonormal rows) or "kaiming" (peft's init, as in the
            reference code's round 0); both seeded.
        seed: seeds A (per layer, mixed with the layer name), so every client and the server start identical.
    """

    METHOD = "FEDSVD"

    r: int = 8
    lora_alpha: float = 8.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    task_type: Optional[str] = None
    init_A: Literal["orthonormal", "kaiming"] = "orthonormal"
    seed: int = 0
    extra_lora_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        # peft's add_adapter reads this first: a FedSVD adapter is a peft LoRA with its own init, not a peft config
        raise AttributeError(
            "FedSVDConfig is not a peft config: add a FedSVD adapter to a peft model with "
            "specpeft.adapters.fedsvd.add_fedsvd_adapter(model, name, config), or wrap a base model with "
            "specpeft.get_adapter_model(model, config)."
        )

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"FedSVDConfig.r={self.r}: the LoRA rank must be ≥ 1 (reference: 8).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"FedSVDConfig.lora_dropout={self.lora_dropout}: must be in [0, 1).")
        if self.init_A not in ("orthonormal", "kaiming"):
            raise ValueError(f"FedSVDConfig.init_A={self.init_A!r}: use 'orthonormal' or 'kaiming'.")
        for name, rank in self.rank_pattern.items():
            if rank < 1:
                raise ValueError(f"FedSVDConfig.rank_pattern[{name!r}]={rank}: ranks must be ≥ 1.")
        for key in ("use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern", "r", "lora_alpha"):
            if key in self.extra_lora_kwargs:
                raise ValueError(
                    f"FedSVDConfig.extra_lora_kwargs[{key!r}] would change the A/B factorization FedSVD relies on; "
                    "remove it (set r / lora_alpha on FedSVDConfig itself)."
                )

    def to_lora_config(self) -> LoraConfig:
        """The plain peft LoraConfig this adapter is saved as."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            lora_dropout=self.lora_dropout,
            bias=self.bias,
            modules_to_save=self.modules_to_save,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            task_type=self.task_type,
            **self.extra_lora_kwargs,
        )


def orthonormal_rows(
    rank: int, width: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A (rank × width) matrix with orthonormal rows, Haar-distributed: Q of a Gaussian's QR with sign-fixed R.

    Generated on the CPU (a seeded `torch.Generator` gives the same matrix on every machine), then cast to `dtype`.
    """
    if rank > width:
        raise ValueError(f"orthonormal_rows: cannot fit {rank} orthonormal rows in width {width}; lower the rank.")
    gaussian = torch.randn(width, rank, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # (width, rank), (rank, rank)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q = q * signs  # fixing R's diagonal positive makes Q Haar-distributed, not biased by the QR convention
    return q.T.contiguous().to(dtype)  # (width, rank) -> (rank, width)


def _lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    layers = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(module, BaseTunerLayer) and isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            layers.append((name, module))
    return layers


def _layer_generator(seed: int, name: str) -> torch.Generator:
    # The adapter-free module path keys the stream, so the same layer gets the same A whatever the adapter name.
    path = name.replace("base_model.model.", "", 1)
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(path.encode())) % (2**63))


def _init_factors(model: nn.Module, adapter_name: str, config: FedSVDConfig) -> None:
    from ..federated.state import find_lora_factors  # here: `import specpeft` loads every adapter, not the core

    find_lora_factors(model, adapter_name)  # every layer is one the federated core can average and re-factorize
    for name, layer in _lora_layers(model, adapter_name):
        weight_a, weight_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        rank, width = weight_a.shape[0], weight_a[0].numel()  # A viewed as (r, in·Πk)
        generator = _layer_generator(config.seed, name)
        if rank > width:  # the server's re-factorization needs r orthonormal rows of width n, whatever the init
            raise ValueError(
                f"FedSVD layer '{name}': r={rank} exceeds its input width {width}, so A cannot have orthonormal rows. "
                "Lower FedSVDConfig.r (or its rank_pattern entry) or exclude this layer (exclude_modules)."
            )
        with torch.no_grad():
            if config.init_A == "orthonormal":
                rows = orthonormal_rows(rank, width, generator)  # (r, in·Πk)
                weight_a.copy_(rows.reshape(weight_a.shape))  # (r, in·Πk) -> the module's (r, in, *k)
            else:
                cpu = torch.empty(weight_a.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)  # peft's LoRA init, seeded
                weight_a.copy_(cpu)
            weight_b.zero_()  # Δ = s·B A = 0: the output at init is the base output


def freeze_lora_A(model: nn.Module, adapter_name: str = "default") -> int:
    """Freeze `lora_A[adapter_name]` in every LoRA layer, durably: peft re-freezes it on `set_adapter`.

    The layer's `frozen_peft_weight_names` is peft's own declaration of adapter weights that stay frozen (MiCA
    uses it for B); we copy the dict before editing it, because the class attribute is shared by all layers.

    Returns:
        The number of layers frozen.
    """
    layers = _lora_layers(model, adapter_name)
    for _, layer in layers:
        frozen = dict(layer.frozen_peft_weight_names)
        if "lora_A" not in frozen.get(adapter_name, ()):
            frozen[adapter_name] = tuple(frozen.get(adapter_name, ())) + ("lora_A",)
        layer.frozen_peft_weight_names = frozen
        layer.lora_A[adapter_name].requires_grad_(False)
    return len(layers)


def build_fedsvd_model(
    model: nn.Module, config: FedSVDConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Registry builder: a peft LoRA model whose `lora_A` is frozen (orthonormal rows) and `lora_B` = 0 trainable.

    Args:
        model: the base model.
        config: FedSVD options.
        adapter_name: the adapter's name.
        **kwargs: forwarded to `peft.get_peft_model`.
    """
    config.validate()
    with rollback_on_failure(model):
        peft_model = get_peft_model(model, config.to_lora_config(), adapter_name=adapter_name, **kwargs)
        _init_factors(peft_model, adapter_name, config)
        freeze_lora_A(peft_model, adapter_name)
    return peft_model


def add_fedsvd_adapter(peft_model: PeftModel, adapter_name: str, config: FedSVDConfig) -> None:
    """Add a second FedSVD adapter to a model built by `build_fedsvd_model` (peft's `add_adapter` plus our init)."""
    config.validate()
    try:
        with rollback_on_failure(peft_model):
            peft_model.add_adapter(adapter_name, config.to_lora_config())
            _init_factors(peft_model, adapter_name, config)
            freeze_lora_A(peft_model, adapter_name)
    except BaseException:
        peft_model.peft_config.pop(adapter_name, None)
        raise


def load_fedsvd_model(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
) -> PeftModel:
    """Load a saved FedSVD adapter (a plain LoRA directory); when `is_trainable`, `lora_A` is frozen again.

    Equivalent to `peft.PeftModel.from_pretrained` followed by `freeze_lora_A` (a LoRA file does not record
    which factor was frozen).
    """
    peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    if is_trainable:
        freeze_lora_A(peft_model, adapter_name)
    return peft_model


REGISTRATION = dict(
    name="fedsvd",
    config_cls=FedSVDConfig,
    builder=build_fedsvd_model,
    description="FedSVD: peft LoRA with A frozen (orthonormal rows), B trained; federated SVD re-factorization.",
)
