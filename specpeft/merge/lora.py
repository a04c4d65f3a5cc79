"""`specpeft to-lora`: any saved adapter → a stock PEFT LoRA adapter (what vLLM, SGLang and diffusers load).

Per layer, with ΔW viewed as a matrix M (per group for grouped convs; ΔWᵀ for embeddings):

    M = U Σ Vᵀ,   B = U_r Σ_r,   A = V_rᵀ,   lora_alpha = r (scale 1),   error = ‖M − B A‖_F / ‖M‖_F

r = min(N, rank bound) with `rank=N` (exact whenever rank(ΔW) ≤ N: SVFit, FedSVD), or the smallest r holding a
fraction E of Σσ² with `energy=E`. Layouts follow peft's LoRA layers: Linear/Conv1D A (r, in), B (out, r) with
`fan_in_fan_out` for Conv1D; ConvNd A (r, in, *k) and B (out, r/groups, 1, …) with `groups` on B, a grouped conv's
A being zero outside each group's input channels; Embedding A (r, num_embeddings), B (dim, r).
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from .._peft_compat import LoraConfig
from ..init.svd import SVDInit, energy_rank, truncated_svd
from .checkpoint import BaseCheckpoint
from .output import check_output, staged_output
from .state_dict import MODEL_PREFIX, LayerDelta, SavedAdapter, pattern_value, load_saved_adapter

REPORT_NAME = "conversion_report.json"


@dataclass
class LayerConversion:
    """One converted layer: its LoRA rank and the relative Frobenius error of B A against ΔW."""

    name: str
    kind: str
    shape: list[int]
    groups: int
    rank: int
    relative_error: float
    delta_norm: float


@dataclass
class ConversionReport:
    """What `convert_to_lora` wrote (also saved as `conversion_report.json` in the output)."""

    out: str
    source_method: str
    mode: str
    value: float
    layers: list[LayerConversion] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_relative_error": self.max_relative_error}


def convert_to_lora(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    base: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
    svd: SVDInit = SVDInit(kind="randomized"),
    progress: bool = True,
) -> ConversionReport:
    """Convert a saved adapter into a stock peft LoRA directory.

    Args:
        adapter: the adapter directory (any specpeft method, or a peft LoRA to re-rank).
        out: the LoRA directory to create (adapter_config.json, adapter_model.safetensors, conversion_report.json).
        rank: N, the LoRA rank (clipped per layer to its rank bound; grouped convs get up to N per group).
        energy: E in (0, 1]: per layer, the smallest rank keeping a fraction E of ΔW's squared singular values.
        base: the base model directory; needed only when ΔW depends on W (DoRA). When given, the adapter's layers
            are checked against it and `target_modules` is written so it matches no other module of the base.
        overwrite: replace a non-empty `out`.
        svd: SVD of each ΔW in `rank` mode. The default randomized range finder (oversampled, 4 power iterations)
            is exact when rank(ΔW) ≤ N and close to the optimal truncation otherwise, at a fraction of a full SVD's
            cost; `SVDInit()` runs the full SVD. The error is always measured, never estimated. `energy` mode
            always runs the full SVD (it needs the whole spectrum).
        progress: show a progress bar over layers.
    """
    start = time.perf_counter()
    if (rank is None) == (energy is None):
        raise ValueError("Pass exactly one of rank=N (e.g. 16) or energy=E (e.g. 0.99).")
    if rank is not None and rank < 1:
        raise ValueError(f"rank={rank}: must be ≥ 1.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy}: must be in (0, 1], e.g. 0.99.")
    adapter, out = os.fspath(adapter), os.fspath(out)
    base = None if base is None else os.fspath(base)
    check_output(out, overwrite, [adapter, base])
    saved = load_saved_adapter(adapter)
    checkpoint, mapping = _check_base(saved, base)
    for layer in saved.layers.values():
        _check_representable(layer)
        if layer.needs_base and checkpoint is None:
            raise ValueError(f"Layer '{layer.name}' is DoRA: its ΔW depends on the base weight; pass --base.")

    tensors: dict[str, Tensor] = {}
    report = ConversionReport(os.path.abspath(out), saved.peft_type, "rank" if rank else "energy",
                              float(rank if rank else energy))
    for layer in tqdm(saved.layers.values(), desc="to-lora", unit="layer", disable=not progress):
        weight = None
        if layer.needs_base:
            weight = layer.from_storage(checkpoint.read_dense(mapping[layer.weight_key]).float())
        delta = layer.delta_weight(weight)
        A, B, layer_rank, error = factorize(layer, delta, rank, energy, svd)
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if layer.kind == "embedding" else (
            "lora_A.weight", "lora_B.weight")
        tensors[f"{MODEL_PREFIX}{layer.name}.{a_name}"] = A.contiguous()
        tensors[f"{MODEL_PREFIX}{layer.name}.{b_name}"] = B.contiguous()
        report.layers.append(LayerConversion(layer.name, layer.kind, list(layer.storage_shape), layer.groups,
                                             layer_rank, error, float(delta.double().norm())))
    for key, read in saved.overrides.items():  # keys in base-model naming (merge/state_dict.py)
        module, leaf = key.rsplit(".", 1)
        if module in saved.layers:  # a trained bias of a layer the LoRA wraps: peft reads it from its base_layer
            key = f"{module}.base_layer.{leaf}"
        tensors[f"{MODEL_PREFIX}{key}"] = read().contiguous()
    config = _lora_config(saved, report, checkpoint, mapping)
    report.seconds = time.perf_counter() - start
    with staged_output(out, overwrite, [adapter, base]) as staging:
        config.save_pretrained(staging)
        save_file(tensors, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, REPORT_NAME), "w") as fh:
            json.dump(report.to_dict(), fh, indent=2)
    return report


def factorize(layer: LayerDelta, delta: Tensor, rank: Optional[int], energy: Optional[float],
              svd: SVDInit = SVDInit()) -> tuple[Tensor, Tensor, int, float]:
    """LoRA factors (A, B) of one layer's ΔW in peft's layout, the LoRA rank and the relative error ‖M − BA‖/‖M‖."""
    groups = layer.groups
    if layer.kind == "embedding":
        blocks = [delta.T]  # ΔW (num, dim) = (B A)ᵀ: factor ΔWᵀ (dim, num)
    else:
        out_per_group = delta.shape[0] // groups
        # (out, in/g, *k) -> groups × (out/g, in/g·prod(k))
        blocks = [delta[g * out_per_group:(g + 1) * out_per_group].reshape(out_per_group, -1) for g in range(groups)]
    if rank is not None:
        block_rank = min(rank, *blocks[0].shape)
        factors = [_block_factors(m, block_rank, svd) for m in blocks]
    else:
        full = [torch.linalg.svd(m.float(), full_matrices=False) for m in blocks]  # U (m, k), S (k,), Vᵀ (k, n)
        block_rank = max(energy_rank(S[:_numerical_rank(S, m.shape)], energy) if float(S.max()) > 0 else 1
                         for m, (_, S, _) in zip(blocks, full))
        factors = [(Vh[:block_rank], U[:, :block_rank] * S[:block_rank]) for U, S, Vh in full]
    residual = sum(float((m.double() - b.double() @ a.double()).pow(2).sum()) for m, (a, b) in zip(blocks, factors))
    total = sum(float(m.double().pow(2).sum()) for m in blocks)
    error = (residual / total) ** 0.5 if total > 0 else 0.0
    if layer.kind in ("embedding", "linear"):
        A, B = factors[0]
        return A, B, block_rank, error
    out_channels, in_per_group, *kernel = layer.weight_shape
    A = torch.zeros(groups * block_rank, groups * in_per_group, *kernel)
    for g, (a, _) in enumerate(factors):
        rows, cols = slice(g * block_rank, (g + 1) * block_rank), slice(g * in_per_group, (g + 1) * in_per_group)
        A[rows, cols] = a.reshape(block_rank, in_per_group, *kernel)  # (r, in/g·k) -> (r, in/g, *k)
    B = torch.cat([b for _, b in factors]).reshape(out_channels, block_rank, *([1] * len(kernel)))  # (out, r/g, 1…)
    return A, B, groups * block_rank, error


def _block_factors(matrix: Tensor, rank: int, svd: SVDInit) -> tuple[Tensor, Tensor]:
    """A = V_rᵀ (r, n), B = U_r Σ_r (m, r) of an (m, n) matrix; zeros for a zero matrix."""
    if not bool(matrix.any()):
        return torch.zeros(rank, matrix.shape[1]), torch.zeros(matrix.shape[0], rank)
    U, S, V = truncated_svd(matrix, rank, svd)
    return V.T.contiguous(), (U * S).contiguous()  # (r, n), (m, r)


def _check_representable(layer: LayerDelta) -> None:
    if layer.kind.startswith("conv"):
        if any(d != 1 for d in layer.dilation):
            raise ValueError(f"Layer '{layer.name}' is a dilated conv (dilation={layer.dilation}); peft's LoRA conv "
                             "builds lora_A without dilation, so no stock LoRA reproduces it. Merge it instead "
                             "(`specpeft merge`).")
        if not layer.standard_forward:
            raise ValueError(f"Layer '{layer.name}' is a conv with a non-zero padding mode or a custom forward; "
                             "peft's LoRA conv would pad it differently. Merge it instead (`specpeft merge`).")


def _check_base(saved: SavedAdapter, base: Optional[str]) -> tuple[Optional[BaseCheckpoint], dict[str, str]]:
    if base is None:
        return None, {}
    checkpoint = BaseCheckpoint(base)
    keys = [layer.weight_key for layer in saved.layers.values()]
    mapping = checkpoint.match(keys)
    for layer in saved.layers.values():
        layer.fit_storage(checkpoint, mapping[layer.weight_key])
    return checkpoint, mapping


def _numerical_rank(singular_values: Tensor, shape: Sequence[int]) -> int:
    """Components above fp32 rounding (numpy's matrix_rank tolerance σ_max·max(m, n)·ε): `energy=1.0` then keeps
    a low-rank ΔW's rank instead of its rounding noise."""
    tolerance = float(singular_values[0]) * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((singular_values > tolerance).sum()))


def _lora_config(saved: SavedAdapter, report: ConversionReport, checkpoint: Optional[BaseCheckpoint],
                 mapping: dict[str, str]) -> LoraConfig:
    """LoRA config: r = the most common rank, rank/alpha_pattern for the others, alpha = r (scale 1)."""
    ranks = {layer.name: layer.rank for layer in report.layers}
    common = max(collections.Counter(ranks.values()).items(), key=lambda item: (item[1], item[0]))[0]
    names = sorted(ranks, key=lambda n: (-n.count("."), n))  # deeper names first: peft takes the first match
    pattern = {n: ranks[n] for n in names if ranks[n] != common}
    if any(pattern_value(pattern, n, common) != ranks[n] for n in names):
        pattern = {re.escape(n): r for n, r in pattern.items()}  # literal keys: no name can match another's
    targets: list[str] | str = sorted(ranks)
    if checkpoint is not None:  # compare in the checkpoint's key space (it may differ by a prefix)
        modules = {k.rsplit(".", 1)[0] for k in checkpoint.logical_keys}
        adapted = {mapping[f"{n}.weight"].rsplit(".", 1)[0] for n in ranks}
        if any(m not in adapted and any(m.endswith("." + n) for n in adapted) for m in modules):
            targets = "^(?:" + "|".join(re.escape(n) for n in sorted(ranks)) + ")$"  # peft full-matches a string
    return LoraConfig(
        r=common,
        lora_alpha=common,
        target_modules=targets,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in saved.layers.values()),
        modules_to_save=saved.modules_to_save or None,
        bias=saved.config.get("bias", "none") if saved.peft_type == "LORA" else "none",
        task_type=saved.config.get("task_type"),
        base_model_name_or_path=saved.config.get("base_model_name_or_path"),
        inference_mode=True,
    )
