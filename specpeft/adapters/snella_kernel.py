"""SNELLA's kernel matrix and its exact top-k mask (spec §3.1, §3.4, §3.8).

Everything is in the weight layout `(out, in) = (m, n)`; `A = in_qs (H, n, r)`, `B = out_qs (H, m, r)`:

    dist_h[j, i] = ‖B_h[j] − A_h[i]‖_p                       (p = 2: sqrt(max(‖b‖² + ‖a‖² − 2 b·a, ε)))
    D = Σ_h c_h dist_h,   c_h = c·(−1)^h
    K = D                                                    kernel = "snell"  (difference of distance kernels)
    K = D + α · softmax_j(D[:, i] / γ) + β                   kernel = "snella" (mixture; softmax over outputs)
    M = 1[(j, i) among the k largest |K|]                    exactly k entries, ties → lowest flat index
    K_eff = K ⊙ |K|_sg ⊙ M   (mask_mode "code")   or   K ⊙ M   ("binary")

Column i of K depends only on A[:, i] (the softmax runs over j), so K is always built in the same fixed column
blocks (`column_blocks`): the training Function (snella_function.py) rebuilds one block at a time in backward, and
every path (forward, backward, `delta_weight`) produces bit-identical K, hence the same mask. The threshold is an
exact radix select on the fp32 bit patterns of |K|: no `torch.quantile` (2^24-element limit) and no sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Optional

import torch
from torch import Tensor

KernelKind = Literal["snella", "snell"]
MaskMode = Literal["code", "binary"]
DIST_EPS = 1e-12  # clamp on squared distances: the gradient of ‖·‖ is undefined at 0 (cdist returns NaN there)
BLOCK_ELEMS = 1 << 18  # at most this many entries per column block of K (1 MiB in fp32) ...
MIN_BLOCKS = 8  # ... and at least this many blocks (backward transients ≤ ~1/8 of m×n each) ...
SMALL_LAYER = 1 << 16  # ... except for layers this small, built in one block (fewer, larger ops)
RADIX_CHUNK = 1 << 18  # entries per bincount call of the radix select (bounds its scratch memory)
# On CUDA every block and chunk is a few kernel launches and the loops run on the host: CPU-sized pieces made a
# 4096×11008 step 8,461 launches (benchmarks/results/profile_layer_cuda.txt). GPU pieces are 16× / 64× larger.
GPU_BLOCK_ELEMS = 1 << 22  # 16 MiB fp32 blocks
GPU_RADIX_CHUNK = 1 << 24


@dataclass(frozen=True)
class KernelSpec:
    """Static choices of one SNELLA layer.

    Attributes:
        kernel: "snella" (mixture of kernels) or "snell" (difference of distance kernels).
        mask_mode: "code" (K ⊙ |K| on kept entries, as the reference code) or "binary" (K on kept entries).
        coeffs: head coefficients c_h (the reference's frozen `shared_coeff_fc`, (+0.1, −0.1)).
        norm_p: the distance's p (2 for "snella").
    """

    kernel: KernelKind = "snella"
    mask_mode: MaskMode = "code"
    coeffs: tuple[float, ...] = (0.1, -0.1)
    norm_p: float = 2.0


def kept_count(sparsity: float, numel: int) -> int:
    """Entries kept at `sparsity`: k = ⌊(1 − s)·N + ½⌋, evaluated exactly (rational arithmetic on the float s)."""
    return math.floor((1 - Fraction(sparsity)) * numel + Fraction(1, 2))


def column_blocks(m: int, n: int, device: torch.device) -> list[tuple[int, int]]:
    """The fixed column ranges [c0, c1) in which K (m, n) is built on `device` (a pure function of m, n, the
    device type and the constants, so every path on one device builds bit-identical blocks)."""
    block_elems = GPU_BLOCK_ELEMS if device.type == "cuda" else BLOCK_ELEMS
    width = n if m * n <= SMALL_LAYER else max(1, min(block_elems // max(1, m), -(-n // MIN_BLOCKS)))
    return [(start, min(start + width, n)) for start in range(0, n, width)]


# -- kernel matrix ----------------------------------------------------------------------------------------------


def distance(a: Tensor, b: Tensor, p: float, inplace: bool) -> Tensor:
    """dist[j, i] = ‖b_j − a_i‖_p for a (n, r), b (m, r) → (m, n)."""
    if p != 2.0:
        return torch.cdist(b, a, p=p)  # (m, r), (n, r) -> (m, n)
    sq = torch.addmm(a.pow(2).sum(1)[None, :], b, a.T, alpha=-2.0)  # ‖a_i‖² − 2 b_j·a_i: (m, n)
    if inplace:
        return sq.add_(b.pow(2).sum(1)[:, None]).clamp_(min=DIST_EPS).sqrt_()
    return sq.add(b.pow(2).sum(1)[:, None]).clamp(min=DIST_EPS).sqrt()


def kernel_block(
    in_qs: Tensor, out_qs: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
    spec: KernelSpec, keep_dists: bool = False,
) -> tuple[Tensor, Optional[Tensor], Tensor, list[Tensor]]:
    """(D, P, K, dists) for the input columns in `in_qs` (H, b, r); P = softmax_j(D/γ) (None for "snell").

    In-place ops are used when autograd is off; the op sequence (and so every bit of K) is the same either way.
    `keep_dists` keeps each head's distance matrix (for the backward) instead of accumulating D into the first.
    """
    inplace = not torch.is_grad_enabled()
    D, dists = None, []
    for h, c in enumerate(spec.coeffs):
        dist = distance(in_qs[h], out_qs[h], spec.norm_p, inplace)
        if keep_dists:
            dists.append(dist)
        if D is None:
            D = dist.mul_(c) if inplace and not keep_dists else dist.mul(c)
        else:
            D = D.add_(dist, alpha=c) if inplace else D.add(dist, alpha=c)
    if spec.kernel == "snell":
        return D, None, D, dists
    z = D.div(gamma)
    z = z.sub_(z.amax(0, keepdim=True)) if inplace else z.sub(z.amax(0, keepdim=True))  # stable softmax over dim 0
    z = z.exp_() if inplace else z.exp()
    P = z.div_(z.sum(0, keepdim=True)) if inplace else z.div(z.sum(0, keepdim=True))
    K = torch.addcmul(D, P, alpha)  # D + α P
    K = K.add_(beta) if inplace else K.add(beta)
    return D, P, K, dists


def kernel_matrix(
    in_qs: Tensor, out_qs: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
    spec: KernelSpec,
) -> Tensor:
    """K (m, n), built block by block in `column_blocks` order; differentiable when autograd is on."""
    m, n = out_qs.shape[1], in_qs.shape[1]
    blocks = column_blocks(m, n, out_qs.device)
    if torch.is_grad_enabled():
        parts = [kernel_block(in_qs[:, c0:c1], out_qs, alpha, gamma, beta, spec)[2] for c0, c1 in blocks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # blocks of (m, b) -> (m, n)
    K = torch.empty(m, n, dtype=out_qs.dtype, device=out_qs.device)
    for c0, c1 in blocks:
        K[:, c0:c1] = kernel_block(in_qs[:, c0:c1], out_qs, alpha, gamma, beta, spec)[2]
    return K


# -- exact top-k mask -------------------------------------------------------------------------------------------


def _radix_kth_smallest(values: Tensor, t: int) -> float:
    """t-th smallest (1-based) of a flat contiguous non-negative fp32 tensor, by a two-pass 16-bit radix select.

    Non-negative IEEE floats order like their int32 bit patterns, so two histograms (2^15 bins of the high half,
    then 2^16 bins of the low half inside the chosen bucket) find the exact value in O(N), chunk by chunk.
    """
    bits = values.view(torch.int32)  # (N,) fp32 -> (N,) int32, same bytes
    chunk_size = _radix_chunk(values)
    high_counts = torch.zeros(1 << 15, dtype=torch.int64, device=values.device)
    for chunk in bits.split(chunk_size):
        high_counts += torch.bincount(chunk >> 16, minlength=1 << 15)
    cum_high = high_counts.cumsum(0)
    bucket = int(torch.searchsorted(cum_high, torch.tensor([t], device=values.device)))
    below = int(cum_high[bucket - 1]) if bucket > 0 else 0
    low_counts = torch.zeros(1 << 16, dtype=torch.int64, device=values.device)
    for chunk in bits.split(chunk_size):
        low_counts += torch.bincount(chunk[(chunk >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    rest = int(torch.searchsorted(low_counts.cumsum(0), torch.tensor([t - below], device=values.device)))
    return float(torch.tensor([(bucket << 16) | rest], dtype=torch.int32).view(torch.float32))  # bits -> value


def _radix_chunk(values: Tensor) -> int:
    return GPU_RADIX_CHUNK if values.is_cuda else RADIX_CHUNK


def kth_smallest(values: Tensor, t: int) -> float:
    """t-th smallest (1-based) entry of a flat non-negative tensor (radix select for fp32, kthvalue otherwise)."""
    if values.dtype == torch.float32:
        return _radix_kth_smallest(values.contiguous(), t)
    return float(values.kthvalue(t).values)


def mask_from_threshold(scores: Tensor, tau: float, tie_index: Tensor, columns: tuple[int, int] | None = None) -> Tensor:
    """scores > τ, plus the tied entries listed in `tie_index` (flat indices into the full (m, n) matrix).

    `columns=(c0, n)` when `scores` holds only the columns c0, c0 + 1, … of an (m, n) matrix (a column block).
    """
    mask = scores > tau
    if tie_index.numel():
        if columns is None:
            mask.view(-1)[tie_index] = True  # (m, n) -> (m·n,) view: flat indices
        else:
            c0, n = columns
            rows, cols = tie_index // n, tie_index % n - c0
            inside = (cols >= 0) & (cols < scores.shape[1])
            mask[rows[inside], cols[inside]] = True
    return mask


def topk_threshold(scores: Tensor, k: int) -> tuple[float, Tensor]:
    """(τ, tie_index) such that `mask_from_threshold(scores, τ, tie_index)` keeps exactly the `k` largest entries,
    ties at τ resolved to the lowest flat indices; `tie_index` (int64) is empty unless several entries equal τ.

    Works chunk by chunk on the flat scores, so its scratch memory does not grow with their size.
    """
    numel = scores.numel()
    no_ties = torch.zeros(0, dtype=torch.int64, device=scores.device)
    if k >= numel:
        return -math.inf, no_ties
    if k <= 0:
        return math.inf, no_ties
    flat = scores.reshape(-1)  # (m, n) -> (m·n,), a view for contiguous scores
    tau = kth_smallest(flat, numel - k)  # the (N−k)-th smallest is the largest dropped value
    chunk_size = _radix_chunk(flat)
    ties = k - int(sum((chunk > tau).count_nonzero() for chunk in flat.split(chunk_size)))  # one sync
    if ties <= 0:
        return tau, no_ties
    found, offset = [], 0
    for chunk in flat.split(chunk_size):  # the first `ties` entries equal to τ, in flat order
        found.append(torch.nonzero(chunk == tau).squeeze(1) + offset)
        offset += chunk.numel()
        if sum(f.numel() for f in found) >= ties:
            break
    return tau, torch.cat(found)[:ties]


def topk_mask(scores: Tensor, k: int) -> tuple[Tensor, float, Tensor]:
    """Mask of exactly the `k` largest entries (ties → lowest flat indices), with its (τ, tie_index)."""
    tau, tie_index = topk_threshold(scores, k)
    return mask_from_threshold(scores, tau, tie_index), tau, tie_index


def effective_kernel(K: Tensor, mask: Tensor, mode: MaskMode) -> Tensor:
    """K_eff = K ⊙ |K|_sg ⊙ M ("code") or K ⊙ M ("binary"); differentiable in K."""
    if mode == "code":
        return K * (K.detach().abs() * mask)
    return K * mask
