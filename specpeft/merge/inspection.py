"""`specpeft inspect`: per-layer statistics of a saved adapter's ΔW, and a plot of the singular spectra.

For each adapted layer, with ΔW viewed as the matrix M (out, in/groups·prod(kernel)) and σ its singular values:

    ‖ΔW‖_F = sqrt(Σ σ_i²),   ‖ΔW‖_2 = σ_1,   rank = #{σ_i > σ_1 · max(m, n) · ε_fp32},
    effective rank = exp(−Σ p_i log p_i) with p_i = σ_i / Σ σ_j   (Roy & Vetterli, 2007)

and, with the base model, ‖W‖_F and the relative update ‖ΔW‖_F / ‖W‖_F.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import BaseCheckpoint
from .state_dict import load_saved_adapter

_EPS32 = torch.finfo(torch.float32).eps


@dataclass
class LayerStats:
    """Statistics of one adapted layer."""

    name: str
    kind: str
    shape: list[int]
    trainable: int
    delta_norm: float
    spectral_norm: float
    rank: int
    effective_rank: float
    singular_values: list[float] = field(repr=False)
    base_norm: Optional[float] = None

    @property
    def relative_norm(self) -> Optional[float]:
        """‖ΔW‖_F / ‖W‖_F (None without the base)."""
        if self.base_norm is None:
            return None
        return self.delta_norm / self.base_norm if self.base_norm > 0 else math.inf


@dataclass
class AdapterSummary:
    """An adapter's method, targets and per-layer statistics."""

    path: str
    method: str
    target_modules: Any
    modules_to_save: list[str]
    layers: list[LayerStats]

    @property
    def trainable(self) -> int:
        return sum(layer.trainable for layer in self.layers)

    def to_dict(self) -> dict:
        layers = [{**layer.__dict__, "relative_norm": layer.relative_norm} for layer in self.layers]
        return {"path": self.path, "method": self.method, "target_modules": self.target_modules,
                "modules_to_save": self.modules_to_save, "trainable": self.trainable, "layers": layers}


def spectrum_stats(singular_values: torch.Tensor, shape: tuple[int, int]) -> tuple[float, float, int, float]:
    """(‖M‖_F, σ_1, numerical rank, effective rank) from the singular values of an (m, n) matrix M."""
    s = singular_values.double()
    top = float(s.max()) if s.numel() else 0.0
    frobenius = float(s.pow(2).sum().sqrt())
    if top == 0.0:
        return frobenius, 0.0, 0, 0.0
    rank = int((s > top * max(shape) * _EPS32).sum())
    p = s[s > 0] / s.sum()
    effective = float(torch.exp(-(p * p.log()).sum()))
    return frobenius, top, rank, effective


def inspect_adapter(adapter: str | os.PathLike, base: Optional[str | os.PathLike] = None,
                    progress: bool = True) -> AdapterSummary:
    """Compute `LayerStats` for every layer of a saved adapter (ΔW rebuilt from the files, one layer at a time).

    Args:
        adapter: the adapter directory.
        base: the base model directory; adds ‖W‖_F and ‖ΔW‖_F / ‖W‖_F (required for DoRA adapters).
        progress: show a progress bar over layers.
    """
    saved = load_saved_adapter(adapter)
    checkpoint, mapping = None, {}
    if base is not None:
        checkpoint = BaseCheckpoint(base)
        keys = [layer.weight_key for layer in saved.layers.values()]
        mapping = checkpoint.match(keys)
    stats = []
    for layer in tqdm(saved.layers.values(), desc="inspect", unit="layer", disable=not progress):
        weight = None
        if checkpoint is not None:
            key = mapping[layer.weight_key]
            layer.fit_storage(checkpoint, key)
            weight = layer.from_storage(checkpoint.read_dense(key).float())
        delta = layer.delta_weight(weight)
        matrix = delta.reshape(layer.matrix_shape)  # (out, in/g, *k) -> (out, in/g·prod(k))
        sigma = torch.linalg.svdvals(matrix.float())
        frobenius, top, rank, effective = spectrum_stats(sigma, layer.matrix_shape)
        stats.append(LayerStats(
            layer.name, layer.kind, list(layer.storage_shape), layer.num_trainable(), frobenius, top, rank,
            effective, sigma.tolist(), None if weight is None else float(weight.double().norm()),
        ))
    return AdapterSummary(os.path.abspath(os.fspath(adapter)), saved.peft_type, saved.target_modules,
                          saved.modules_to_save, stats)


def format_summary(summary: AdapterSummary) -> str:
    """A plain-text report: header lines and one table row per layer."""
    lines = [
        f"adapter:        {summary.path}",
        f"method:         {summary.method}",
        f"targets:        {summary.target_modules}",
        f"layers:         {len(summary.layers)}",
        f"trainable:      {summary.trainable:,}",
    ]
    if summary.modules_to_save:
        lines.append(f"modules_to_save: {summary.modules_to_save}")
    with_base = any(layer.base_norm is not None for layer in summary.layers)
    header = ["layer", "kind", "shape", "params", "‖ΔW‖_F", "σ_1", "rank", "eff.rank"] + (
        ["‖W‖_F", "‖ΔW‖/‖W‖"] if with_base else [])
    rows = []
    for layer in summary.layers:
        row = [layer.name, layer.kind, "×".join(map(str, layer.shape)), f"{layer.trainable:,}",
               f"{layer.delta_norm:.4g}", f"{layer.spectral_norm:.4g}", str(layer.rank), f"{layer.effective_rank:.2f}"]
        if with_base:
            row += [f"{layer.base_norm:.4g}", f"{layer.relative_norm:.3e}"]
        rows.append(row)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines.append("")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def plot_spectra(summary: AdapterSummary, path: str | os.PathLike) -> None:
    """Save a figure of σ_i(ΔW) / σ_1 per layer (log scale): one panel per module type, colour = depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[LayerStats]] = {}
    for layer in summary.layers:
        groups.setdefault(layer.name.rsplit(".", 1)[-1], []).append(layer)
    columns = min(3, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (kind, layers) in zip(axes.flat, groups.items()):
        for i, layer in enumerate(layers):
            sigma = torch.tensor(layer.singular_values)
            if sigma.numel() == 0 or float(sigma[0]) == 0.0:
                continue
            ratio = (sigma / sigma[0]).clamp_min(1e-12)
            ax.semilogy(range(1, len(ratio) + 1), ratio.tolist(), color=cmap(i / max(1, len(layers) - 1)),
                        lw=1.0, label=layer.name if len(layers) <= 6 else None)
        ax.set_title(f"{kind} ({len(layers)} layers)", fontsize=9)
        ax.set_xlabel("i")
        ax.set_ylabel("σ_i / σ_1")
        ax.grid(True, which="both", alpha=0.3)
        if len(layers) <= 6:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"ΔW singular spectra: {summary.method} ({os.path.basename(summary.path)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
    plt.close(fig)
