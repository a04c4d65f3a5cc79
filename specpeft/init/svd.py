"""Truncated SVD of weight matrices (full or randomized) and spectral rank rules (energy, elbow).

Everything runs in fp32: PyTorch has no bf16/fp16 SVD kernel, so lower-precision weights are up-cast. The randomized
path is Halko, Martinsson & Tropp (arXiv 0909.4061, Alg. 4.4 + 5.1) with the oversampling measured in
anchors/performance.md §3.2: without it (PEFT's q = r) the Frobenius error looks fine but the last singular vectors
are wrong (min principal cosine 0.29 on a σ_i ∝ i^-0.5 spectrum), and SVFit/PiSSA-style adapters train along them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["SVDInit", "truncated_svd", "svd_by_energy", "energy_rank", "elbow_rank"]

_FIRST_ENERGY_RANK = 16  # first rank tried by svd_by_energy's growing partial SVD


def _is_int(value: object) -> bool:
    """True for Python/NumPy/0-d tensor integers, False for bool (an int subclass that is never a rank)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


@dataclass(frozen=True)
class SVDInit:
    """Typed SVD options. kind="full": torch.linalg.svd; kind="randomized": Halko et al. range finder.

    Attributes:
        kind: "full" (exact, O(mn·min(m, n))) or "randomized" (O(mn·(r+p)·(2·niter+2)) for a rank-r request).
        oversample: extra sketch columns p; None -> max(8, rank // 2).
        niter: power iterations, each followed by a QR so the basis does not collapse onto σ_1 in fp32.
        seed: seeds a CPU torch.Generator for the Gaussian sketch, so results do not depend on the device.
    """

    kind: Literal["full", "randomized"] = "full"
    oversample: int | None = None
    niter: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("full", "randomized"):
            raise ValueError(f"SVDInit.kind must be 'full' or 'randomized', got {self.kind!r}")
        if self.oversample is not None and (not _is_int(self.oversample) or self.oversample < 0):
            raise ValueError(
                f"SVDInit.oversample must be None (-> max(8, rank // 2)) or an int >= 0, got {self.oversample!r}"
            )
        if not _is_int(self.niter) or self.niter < 0:
            raise ValueError(f"SVDInit.niter must be an int >= 0 (4 is the measured default), got {self.niter!r}")
        if not _is_int(self.seed):
            raise ValueError(f"SVDInit.seed must be an int, got {self.seed!r}")


def truncated_svd(weight: Tensor, rank: int, init: SVDInit = SVDInit()) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` SVD of a 2-D matrix in fp32: W ≈ U diag(S) Vᵀ.

    Runs on weight's device; any float dtype is accepted (bf16/fp16 are up-cast, no bf16 SVD exists).
    Memory beyond W (and its fp32 copy when W is not fp32): full keeps U (m×k), S, Vᵀ (k×n) with k = min(m, n)
    (full_matrices=False); randomized keeps only m×l and n×l blocks with l = rank + oversample, plus an l×n
    projection and its l×l left factor. When l >= min(m, n) the sketch would not save anything, so the full path runs.

    Args:
        weight: (m, n) floating-point matrix.
        rank: number of leading singular triplets r, 1 <= r <= min(m, n).
        init: full or randomized options.

    Returns:
        U (m×r) and V (n×r) with orthonormal columns (V, not Vᵀ) and S (r,) in descending order, all fp32.

    Raises:
        ValueError: weight is not a finite 2-D float matrix, or rank is outside [1, min(m, n)].
    """
    w, _ = _as_fp32_matrix(weight)
    limit = min(w.shape)
    if not _is_int(rank) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be an int in [1, min(m, n)] = [1, {limit}] for weight of shape {tuple(w.shape)}, got {rank!r}"
        )
    return _svd(w, int(rank), init)


def svd_by_energy(
    weight: Tensor, threshold: float, max_rank: int | None = None, init: SVDInit = SVDInit()
) -> tuple[Tensor, Tensor, Tensor]:
    """Smallest r with Σ_{i≤r} σ_i² >= threshold·‖W‖_F² (clamped by max_rank), and its rank-r factors.

    Both paths use ‖W‖_F² = Σ σ_i² (summed in float64) as the denominator, so the randomized path never needs the
    full spectrum: it grows a partial SVD (rank 16, 32, ... doubling, ≤ ~2x the cost of the final sketch) until its
    captured energy reaches the target. Randomized σ slightly underestimate the true ones, so near a boundary it may
    pick r one larger than the full path. For τ = 0.99 on pretrained weights r is a large fraction of min(m, n), and
    "full" is usually the cheaper choice.

    Args:
        weight: (m, n) floating-point matrix.
        threshold: energy fraction τ in (0, 1].
        max_rank: cap on r (>= 1); values above min(m, n) mean no cap.
        init: full or randomized options.

    Returns:
        U (m×r), S (r,), V (n×r) in fp32, as truncated_svd.

    Raises:
        ValueError: invalid weight, threshold outside (0, 1], or max_rank < 1.
    """
    w, energy = _as_fp32_matrix(weight)
    _check_threshold(threshold)
    if max_rank is not None and (not _is_int(max_rank) or max_rank < 1):
        raise ValueError(f"max_rank must be None or an int >= 1, got {max_rank!r}")
    full = min(w.shape)
    cap = full if max_rank is None else min(int(max_rank), full)
    target = threshold * energy

    k = min(_FIRST_ENERGY_RANK, cap)
    # Once the sketch would be as wide as the matrix, one full SVD is cheaper than any further doubling.
    while init.kind == "randomized" and k + _oversample(k, init) < full:
        u, s, v = _svd(w, k, init)
        r = _first_reaching(s, target)
        # Reaching the cap means the answer is the cap, even if rounding keeps Σσ² a hair below τ·‖W‖².
        if r is not None or k == cap:
            r = r or k
            return u[:, :r].contiguous(), s[:r].contiguous(), v[:, :r].contiguous()
        k = min(2 * k, cap)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(_first_reaching(s, target) or full, cap)
    return _contiguous(u[:, :r], s[:r], vh[:r].mT)


def energy_rank(singular_values: Tensor, threshold: float, total_energy: float | None = None) -> int:
    """min k with Σ_{i≤k} σ_i² >= threshold · total_energy, over σ sorted in descending order.

    total_energy defaults to Σ σ_i²; pass ‖W‖_F² when only a partial spectrum is known. If the given values never
    reach the target (partial spectrum, external total), every supplied component is needed: returns len(σ).
    Example: σ = [5, 3, 2, 1, 0.1, 0.01], τ = 0.99 -> 4.

    Raises:
        ValueError: σ not a non-empty 1-D tensor of finite values >= 0, threshold outside (0, 1],
            or total_energy negative / not finite.
    """
    s = _check_spectrum(singular_values)
    _check_threshold(threshold)
    if total_energy is None:
        total = float((s * s).sum())
    else:
        total = float(total_energy)
        if not math.isfinite(total) or total < 0:
            raise ValueError(f"total_energy must be a finite value >= 0 (e.g. ‖W‖_F²), got {total_energy!r}")
    return _first_reaching(s, threshold * total) or s.numel()


_ON_CHORD = 1e-6  # a distance below the chord up to this is fp32 rounding (straight or log-geometric spectra)


def elbow_rank(singular_values: Tensor) -> int:
    """Kneedle elbow of the decreasing spectrum (methods spec §2.5).

    With K values sorted descending, x_i = (i−1)/(K−1) and y_i = (σ_i − σ_K)/(σ_1 − σ_K) put the curve in the
    unit square; the elbow is argmax_i (1 − x_i) − y_i, the point farthest below the chord from (0, 1) to (1, 0),
    returned 1-based. The elbow is the corner point itself: for a step spectrum (r large values, then a floor) it is
    the first floor value, r + 1; the spec combines it with energy_rank by min(). A spectrum with no point strictly
    below the chord (flat, concave, a one-value floor, K ≤ 2) has no elbow and nothing the rule can call negligible,
    so it returns K and leaves the choice to the energy rule.

    Raises:
        ValueError: σ not a non-empty 1-D tensor of finite values >= 0.
    """
    s = _check_spectrum(singular_values)
    k = s.numel()
    span = float(s[0] - s[-1])
    if k == 1 or span <= 0.0:
        return k
    x = torch.arange(k, dtype=torch.float64) / (k - 1)
    y = (s - s[-1]) / span
    below = (1.0 - x) - y  # 0 at both ends
    best = int(torch.argmax(below))  # the first of ties: the smaller rank
    return best + 1 if float(below[best]) > _ON_CHORD else k


def _svd(w: Tensor, rank: int, init: SVDInit) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` SVD of a validated fp32 matrix."""
    m, n = w.shape
    width = rank + _oversample(rank, init)
    if init.kind == "full" or width >= min(m, n):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return _contiguous(u[:, :rank], s[:rank], vh[:rank].mT)

    gen = torch.Generator(device="cpu").manual_seed(init.seed)
    omega = torch.randn(n, width, generator=gen, dtype=torch.float32).to(w.device)
    basis = torch.linalg.qr(w @ omega).Q  # m×l orthonormal basis of range(W Ω)
    del omega
    for _ in range(init.niter):
        # Power iteration (W Wᵀ)^q sharpens the decay by σ^(2q+1); QR after each product keeps fp32 from
        # collapsing the basis onto the top singular vector.
        basis = torch.linalg.qr(w.mT @ basis).Q  # n×l
        basis = torch.linalg.qr(w @ basis).Q  # m×l
    small_u, s, vh = torch.linalg.svd(basis.mT @ w, full_matrices=False)  # SVD of the l×n projection QᵀW
    u = basis @ small_u[:, :rank]
    return _contiguous(u, s[:rank], vh[:rank].mT)


def _oversample(rank: int, init: SVDInit) -> int:
    return init.oversample if init.oversample is not None else max(8, rank // 2)


def _frobenius_sq(w: Tensor) -> float:
    """‖W‖_F² accumulated in float64 over ~1M-element row blocks (8 MiB temporaries, no float64 copy of W).

    torch's fp32 vector_norm is off by ~1e-3 relative on a 4096² matrix (CPU); on a slowly decaying spectrum that
    shifts a τ = 0.99 energy rank by many components.
    """
    rows = max(1, (1 << 20) // w.shape[1])
    norms = torch.stack([torch.linalg.vector_norm(block, dtype=torch.float64) for block in w.split(rows)])
    return float(norms.square().sum())  # one host sync, not one per block


def _first_reaching(s: Tensor, target: float) -> int | None:
    """1-based min k with Σ_{i≤k} s_i² >= target (float64 sums), or None if the values never reach it."""
    cum = torch.cumsum(s.detach().to(device="cpu", dtype=torch.float64) ** 2, dim=0)
    idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))[0])
    return idx + 1 if idx < cum.numel() else None


def _contiguous(u: Tensor, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Copies of the slices, so the full-size U/Vᵀ they came from can be freed.
    return u.contiguous(), s.contiguous(), v.contiguous()


def _as_fp32_matrix(weight: Tensor) -> tuple[Tensor, float]:
    """Validated fp32 view/copy of weight and its ‖W‖_F² (finite iff every entry is: the NaN/Inf check for free)."""
    if not isinstance(weight, Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(
            f"weight must be a 2-D matrix, got shape {tuple(weight.shape)}; reshape N-d (conv) weights to "
            "(out, in * prod(kernel)) first"
        )
    if not weight.is_floating_point() or weight.numel() == 0:
        raise ValueError(
            f"weight must be a non-empty float matrix, got dtype {weight.dtype}, shape {tuple(weight.shape)}"
        )
    w = weight.detach().to(torch.float32)
    energy = _frobenius_sq(w)
    if not math.isfinite(energy):
        raise ValueError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf; SVD of it is undefined")
    return w, energy


def _check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be an energy fraction in (0, 1] (e.g. 0.99), got {threshold!r}")


def _check_spectrum(singular_values: Tensor) -> Tensor:
    if not isinstance(singular_values, Tensor) or singular_values.ndim != 1 or singular_values.numel() == 0:
        shape = tuple(singular_values.shape) if isinstance(singular_values, Tensor) else type(singular_values).__name__
        raise ValueError(f"singular_values must be a non-empty 1-D tensor, got {shape}")
    s = singular_values.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("singular_values must be finite and >= 0")
    # Rank rules are defined on the spectrum in descending order, whatever order the caller kept.
    return torch.sort(s, descending=True).values
