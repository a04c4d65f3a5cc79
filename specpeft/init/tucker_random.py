"""Seeded shared random factors of a Tucker network: one flat frozen buffer per mode-shape bucket, regenerated
bit-identically from `(seed, mode sizes, ranks)` on any machine (spec tera_fedsvd_snella.md §1.4).

Draws are integers from a CPU torch.Generator turned into floats with exact arithmetic only (no transcendental
function), so the buffer does not depend on the CPU's vector units or libm.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from .tucker import TuckerShape

__all__ = ["bucket_seed", "shared_random_factors", "split_shared"]

_UNIFORM_BITS = 24  # each uniform draw is (k + 1/2)/2^24, k a 24-bit integer: exact in float64
_IRWIN_HALL_TERMS = 12  # Σ of 12 U(0,1) − 6 has mean 0 and variance 1 (Irwin–Hall)


def bucket_seed(seed: int, shape: TuckerShape) -> int:
    """63-bit generator seed: the first 8 bytes of sha256(f"{seed}|{shape.key}")."""
    digest = hashlib.sha256(f"{seed}|{shape.key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _standard_normal_approx(numel: int, generator: torch.Generator) -> Tensor:
    """`numel` draws of Σ_{i=1..12} u_i − 6 (Irwin–Hall: mean 0, variance 1, bounded by ±6), float64 on CPU.

    u_i = (k_i + 1/2)/2^24 from 24-bit integer draws of a CPU torch.Generator (mt19937, integer arithmetic). Every
    step is exact in float64 (the sum has at most 28 significant bits), so unlike torch.randn, whose fp32 kernel
    differs between AVX2 and scalar builds and whose fp64 kernel calls libm, the result is identical on every
    machine for a given torch generator algorithm.
    """
    draws = torch.randint(0, 2**_UNIFORM_BITS, (_IRWIN_HALL_TERMS, numel), generator=generator, dtype=torch.int64)
    total = draws.sum(dim=0) + _IRWIN_HALL_TERMS // 2  # Σ_i (k_i + 1/2) = Σ_i k_i + 12/2, an exact integer
    return total.double() / 2.0**_UNIFORM_BITS - _IRWIN_HALL_TERMS / 2


def shared_random_factors(seed: int, shape: TuckerShape) -> Tensor:
    """The frozen core and factors of one bucket, packed into one flat fp32 CPU buffer.

    Layout: [vec(𝒢) | vec(U_1) | … | vec(U_N)] (row-major), drawn in that order from
    `torch.Generator().manual_seed(bucket_seed(seed, shape))`. Variances (spec §1.4): 𝒢 ~ 1/n, U_k ~ 1/R_k, so with
    unit scaling vectors every entry of Δ has variance 1/n whatever the bucket.
    """
    generator = torch.Generator(device="cpu").manual_seed(bucket_seed(seed, shape))
    stds = [1.0 / math.sqrt(shape.in_features)] + [1.0 / math.sqrt(r) for r in shape.ranks]
    sizes = [math.prod(shape.ranks)] + [j * r for j, r in zip(shape.mode_sizes, shape.ranks)]
    parts = [_standard_normal_approx(size, generator) * std for size, std in zip(sizes, stds)]
    return torch.cat(parts).float()


def split_shared(flat: Tensor, shape: TuckerShape) -> tuple[Tensor, list[Tensor]]:
    """Views of the core (R_1..R_N) and factors [U_k (J_k × R_k)] inside a flat buffer (no copy)."""
    if flat.numel() != shape.num_shared:
        raise ValueError(
            f"Shared factor buffer of bucket '{shape.key}' has {flat.numel()} entries, expected {shape.num_shared}. "
            "It was saved for another mode shape; regenerate it (save_shared_factors=False) or fix the config."
        )
    sizes = [math.prod(shape.ranks)] + [j * r for j, r in zip(shape.mode_sizes, shape.ranks)]
    pieces = torch.split(flat, sizes)
    core = pieces[0].view(shape.ranks)  # (∏R,) -> (R_1..R_N)
    factors = [piece.view(j, r) for piece, j, r in zip(pieces[1:], shape.mode_sizes, shape.ranks)]  # -> (J_k, R_k)
    return core, factors
