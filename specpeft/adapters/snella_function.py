"""SNELLA's training op as one autograd Function: y = op(x, [W0 +] s·K_eff), with no m×n tensor saved.

Forward builds |K| (m, n) and its sign bits block by block, selects the exact top-k (snella_kernel.py), turns
|K| into W0 + s·K_eff in place, applies `F.linear`/`F.convNd` and frees it: autograd keeps x, the small factors,
τ and the (usually empty) tie list, plus a reference to the base weight when it is fused in. Peak transient:
|K| and the sign bits (1.25 m×n fp32 words) plus O(m × block) scratch.

Backward rebuilds K one column block at a time (the blocks of `column_blocks`, bit-identical to the forward's),
so its transient memory is O(m × block), and applies the hand-derived chain rule, per block b:

    ∂L/∂Δ_b = ∂Yᵀ X_b  (linear; conv: one VJP on the rebuilt weight),   ∂L/∂X_b = ∂Y (W0 + s K_eff)_b
    ∂s += ⟨∂L/∂Δ_b, K_eff_b⟩,   ∂K_b = s ∂L/∂Δ_b ⊙ (|K_b| ⊙ M_b  or  M_b)
    snella:  ∂β += Σ ∂K_b,  ∂α += ⟨∂K_b, P_b⟩,  ∂Z_b = α P_b ⊙ (∂K_b − colsum(∂K_b ⊙ P_b)),
             ∂γ −= ⟨∂Z_b, D_b⟩/γ²,  ∂D_b = ∂K_b + ∂Z_b/γ
    p = 2:   E_h = c_h ∂D_b ⊘ dist_h (0 where the ε clamp is active),
             ∂B_h += B_h ⊙ rowsum(E_h) − E_h A_h,b,   ∂A_h,b = A_h,b ⊙ colsum(E_h) − E_hᵀ B_h
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels._dispatch import autocast_off
from .base import FrozenBase
from .geometry import LayerGeometry
from .snella_kernel import (
    DIST_EPS,
    KernelSpec,
    column_blocks,
    distance,
    kernel_block,
    mask_from_threshold,
    topk_threshold,
)


@dataclass(frozen=True)
class LayerPlan:
    """What the Function needs besides tensors: the kernel spec, the kept count and how to apply the weight."""

    spec: KernelSpec
    kept: int
    geometry: LayerGeometry
    base: Optional[FrozenBase] = None  # the layer: convs with their own forward (e.g. "same" padding) run it

    def apply(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """op(x, weight) (+ bias) with the layer's settings (`FrozenBase.apply_weight` when the layer is known)."""
        if self.base is None:
            return self.geometry.apply(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return self.base.apply_weight(x, weight, bias)


def _abs_and_sign(factors: tuple, spec: KernelSpec, m: int, n: int) -> tuple[Tensor, Tensor]:
    """|K| (m, n) and the bool K < 0, built block by block: 1.25 m×n words instead of K and |K| side by side."""
    in_qs, out_qs = factors[0], factors[1]
    magnitude = torch.empty(m, n, dtype=out_qs.dtype, device=out_qs.device)
    negative = torch.empty(m, n, dtype=torch.bool, device=out_qs.device)
    for c0, c1 in column_blocks(m, n, out_qs.device):
        K = kernel_block(in_qs[:, c0:c1], out_qs, *factors[2:], spec)[2]
        torch.lt(K, 0, out=negative[:, c0:c1])
        torch.abs(K, out=magnitude[:, c0:c1])
    return magnitude, negative


def _weight_in_place(
    magnitude: Tensor, negative: Tensor, tau: float, tie_index: Tensor, spec: KernelSpec, scale: float,
    weight: Optional[Tensor],
) -> Tensor:
    """Turn |K| into [W0 +] s·K_eff in place, block by block: K_eff = ±|K|·|K| ("code") or ±|K| ("binary") on
    kept entries (|K|·|K|·sign(K) is bit-identical to K·|K|), 0 elsewhere."""
    m, n = magnitude.shape
    w0 = None if weight is None else weight.reshape(m, n)  # (out, in/g, *k) -> (m, n)
    for c0, c1 in column_blocks(m, n, magnitude.device):
        block = magnitude[:, c0:c1]
        dropped = mask_from_threshold(block, tau, tie_index, (c0, n)).logical_not_()
        if spec.mask_mode == "code":
            block.mul_(block)
        block.copy_(torch.where(negative[:, c0:c1], -block, block)).masked_fill_(dropped, 0.0).mul_(scale)
        if w0 is not None:
            block.add_(w0[:, c0:c1])
    return magnitude


def _conv_vjp(plan: LayerPlan, x: Tensor, grad_out: Tensor, weight: Tensor, need_x: bool):
    """(∂L/∂x, ∂L/∂W) of y = conv(x, W): one extra conv forward, exact for every padding mode."""
    with torch.enable_grad():
        w_leaf = weight.detach().to(x.dtype).requires_grad_(True)
        x_leaf = x.detach().requires_grad_(need_x)
        y = plan.apply(x_leaf, w_leaf)
        grads = torch.autograd.grad(y, (x_leaf, w_leaf) if need_x else (w_leaf,), grad_out)
    return (grads[0] if need_x else None), grads[-1]


class SNELLAFunction(torch.autograd.Function):
    """y = op(x, W0 + s·K_eff) (+ bias), or op(x, s·K_eff) when `weight` is None."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, in_qs: Tensor, out_qs: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor],
        beta: Optional[Tensor], scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], plan: LayerPlan,
    ) -> Tensor:
        spec, geometry = plan.spec, plan.geometry
        m, n = geometry.matrix_shape
        factors = (in_qs, out_qs, alpha, gamma, beta)
        with autocast_off(in_qs.device.type):  # K in the factors' dtype (its top-k is the mask); the op may autocast
            magnitude, negative = _abs_and_sign(factors, spec, m, n)  # autograd is off in forward: in place
            tau, tie_index = topk_threshold(magnitude, plan.kept)
            w = _weight_in_place(magnitude, negative, tau, tie_index, spec, float(scale), weight)
        del negative
        w = w.view(geometry.weight_shape)  # (m, n) -> (out, in/g, *k)
        out = plan.apply(x, w, bias)
        ctx.save_for_backward(x, in_qs, out_qs, alpha, gamma, beta, scale, weight, tie_index)
        ctx.plan, ctx.tau = plan, tau
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        with autocast_off(grad_out.device.type):  # a backward run inside autocast rebuilds the forward's K
            return SNELLAFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor) -> tuple:
        x, in_qs, out_qs, alpha, gamma, beta, scale, weight, tie_index = ctx.saved_tensors
        plan: LayerPlan = ctx.plan
        spec, geometry = plan.spec, plan.geometry
        m, n = geometry.matrix_shape
        dtype, s, need_x = in_qs.dtype, float(scale), ctx.needs_input_grad[0]
        factors = (in_qs, out_qs, alpha, gamma, beta)
        linear = geometry.kind == "linear"
        grad_x = G_full = None
        if linear:
            go2 = grad_out.reshape(-1, m).to(dtype)  # (..., m) -> (T, m)
            x2 = x.reshape(-1, n).to(dtype)  # (..., n) -> (T, n)
            w0 = None if weight is None else weight.reshape(m, n)  # (out, in) stays (m, n) for linear
            if need_x:
                grad_x = torch.empty(x2.shape, dtype=dtype, device=x.device)
        else:  # conv: ∂L/∂W needs the whole rebuilt weight once; the factor chain rule still runs in blocks
            magnitude, negative = _abs_and_sign(factors, spec, m, n)
            w = _weight_in_place(magnitude, negative, ctx.tau, tie_index, spec, s, weight)
            del negative
            grad_x, G_full = _conv_vjp(plan, x, grad_out, w.view(geometry.weight_shape), need_x)  # (m, n) -> kernel
            del w, magnitude
            G_full = G_full.reshape(m, n).to(dtype)  # (out, in/g, *k) -> (m, n)
        grad_in, grad_outq = torch.zeros_like(in_qs), torch.zeros_like(out_qs)
        zero = torch.zeros((), dtype=dtype, device=in_qs.device)
        grad_scale, grad_alpha, grad_beta, grad_gamma = zero, zero, zero, zero
        floor = math.sqrt(DIST_EPS)
        for c0, c1 in column_blocks(m, n, in_qs.device):
            a_blk = in_qs[:, c0:c1]
            D, P, K, dists = kernel_block(a_blk, out_qs, alpha, gamma, beta, spec, keep_dists=spec.norm_p == 2.0)
            dropped = mask_from_threshold(K.abs(), ctx.tau, tie_index, (c0, n)).logical_not_()
            keff = (K.abs().mul_(K) if spec.mask_mode == "code" else K.clone()).masked_fill_(dropped, 0.0)
            G = go2.T @ x2[:, c0:c1] if linear else G_full[:, c0:c1].contiguous()  # ∂L/∂Δ_b: (m, T)(T, b) -> (m, b)
            grad_scale = grad_scale + torch.dot(G.view(-1), keff.view(-1))  # (m, b) -> (m·b,) both
            if linear and need_x:
                w_blk = keff.mul_(s) if w0 is None else keff.mul_(s).add_(w0[:, c0:c1])
                grad_x[:, c0:c1] = go2 @ w_blk  # (T, m) @ (m, b) -> (T, b)
            del keff
            G.masked_fill_(dropped, 0.0).mul_(s)  # ∂L/∂K_b = s ∂L/∂Δ_b ⊙ (|K_b| ⊙ M_b  or  M_b)
            if spec.mask_mode == "code":
                G.mul_(K.abs_())
            del dropped
            if spec.kernel == "snella":
                grad_beta = grad_beta + G.sum()
                GP = G * P
                grad_alpha = grad_alpha + GP.sum()  # ⟨∂K_b, P_b⟩
                grad_z = torch.sub(G, GP.sum(0, keepdim=True), out=GP).mul_(P).mul_(alpha)  # ∂Z_b, Z = D/γ
                g = float(gamma)
                grad_gamma = grad_gamma - torch.dot(grad_z.view(-1), D.reshape(-1)) / (g * g)  # (m, b) -> (m·b,)
                G.add_(grad_z, alpha=1.0 / g)  # ∂L/∂D_b
                del GP, grad_z
            del D, P, K
            for h, c in enumerate(spec.coeffs):
                a, b = a_blk[h], out_qs[h]
                if spec.norm_p == 2.0:
                    e = dists[h]
                    clamped = e <= floor
                    e = torch.div(G, e, out=e).mul_(c).masked_fill_(clamped, 0.0)  # E_h
                    grad_outq[h] += b * e.sum(1, keepdim=True) - e @ a  # (m, b) @ (b, r) -> (m, r)
                    grad_in[h, c0:c1] = a * e.sum(0)[:, None] - e.T @ b  # (b, m) @ (m, r) -> (b, r)
                else:
                    with torch.enable_grad():
                        a_leaf, b_leaf = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
                        dist = distance(a_leaf, b_leaf, spec.norm_p, inplace=False)
                        ga, gb = torch.autograd.grad(dist, (a_leaf, b_leaf), G * c)
                    grad_in[h, c0:c1], grad_outq[h] = ga, grad_outq[h] + gb
            dists.clear()
        if linear and need_x:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)  # (T, n) -> (..., n)
        snella = spec.kernel == "snella"
        return (
            grad_x, grad_in, grad_outq,
            grad_alpha.reshape(alpha.shape) if snella else None,
            grad_gamma.reshape(gamma.shape) if snella else None,
            grad_beta.reshape(beta.shape) if snella else None,
            grad_scale.reshape(scale.shape), None, None, None,  # 0-d sums -> the scalars' () shapes
        )


def snella_apply(
    x: Tensor, in_qs: Tensor, out_qs: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor],
    beta: Optional[Tensor], scale: Tensor, plan: LayerPlan, weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """`op(x, [W0 +] s·K_eff) [+ bias]` through `SNELLAFunction` (K rebuilt in backward, never saved)."""
    return SNELLAFunction.apply(x, in_qs, out_qs, alpha, gamma, beta, scale, weight, bias, plan)
