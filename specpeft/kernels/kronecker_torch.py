"""Torch Kronecker contractions as plain 2-D GEMMs: the factor gradients of every Kronecker op, and the merged op.

Row t of x, viewed row-major as X_t (n1×n2), gives y_t = vec(Σ_k A_k X_t B_kᵀ) = (Σ_k A_k ⊗ B_k) x_t. Three pieces:

* `kronecker_factor_grads`: dA_k = Σ_t G_t B_k X_tᵀ and dB_k = Σ_t G_tᵀ A_k X_t, reductions over all tokens into
  R·(m1·n1 + m2·n2) numbers, from x and dY alone. The backward of the Triton `kronecker_linear` and of the merged
  op below.
* `kronecker_linear_bmm`: y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ as token-batched GEMMs, the torch path of
  `kernels.kronecker_linear` on CUDA, with a hand-written backward (`apply_kronecker_op` runs it and the CPU op of
  kronecker_gemm.py the same way).
* `kronecker_merged_linear`: y = x (W + Σ_k A_k ⊗ B_k)ᵀ + b as one GEMM on the merged weight, rebuilt in backward,
  never saved. With many tokens this beats applying the factors to x (three Kronecker passes per step): the base
  GEMMs absorb ΔW and only the factor gradients are extra, with no m×n dΔ (TeRA's Δ = P ⊗ M_N layers).

Chunks of tokens bound the T-sized intermediates (`token_chunks`; SoKA's op uses the same chunks).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..init.tucker_cost import kronecker_a_first, kronecker_grads_cost
from ._dispatch import as_dtype, autocast_dtype, autocast_off

__all__ = [
    "KroneckerBmmFunction",
    "KroneckerMergedFunction",
    "accumulate_mm",
    "input_grad",
    "kronecker_factor_grads",
    "kronecker_merged_linear",
    "kronecker_merged_weight",
    "op_output",
    "token_chunks",
]

# Tokens per chunk: the T-sized intermediates (16 MB in fp32) are built per chunk of
# tokens, never for all T at once. Above glibc's 32 MB mmap threshold every call would get freshly zeroed pages
# (measured on CPU: SoKA's first-stage GEMM ran 2× slower), and each chunk is reused by the next GEMM from cache. 1M-element
# chunks were ~8 % faster on one idle core but much slower with 2 threads on a loaded box (every GEMM is a thread
# barrier), hence 4M.
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_DEFAULT_CHUNK_ELEMENTS = 1 << 27  # accelerators: few large launches beat cache-sized pieces
_GRAD_CHUNK_ELEMENTS = 1 << 25  # accelerators, factor gradients: all four per-chunk intermediates together (128 MB)


def token_chunks(tokens: int, per_token: int, device: torch.device,
                 accelerator_elements: int = _DEFAULT_CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `_CHUNK_ELEMENTS` (CPU) or `accelerator_elements` / per_token tokens each."""
    step = max(1, _CHUNK_ELEMENTS.get(device.type, accelerator_elements) // max(1, per_token))
    return [(start, min(tokens, start + step)) for start in range(0, tokens, step)]


def accumulate_mm(acc: Tensor, left: Tensor, right: Tensor) -> None:
    """acc += left @ right, summed in acc's dtype (fp32 factor gradients from 16-bit activations)."""
    if left.dtype == acc.dtype:
        acc.addmm_(left, right)
    else:
        acc += (left @ right).to(acc.dtype)


def pad_columns(rows: Tensor, size: int) -> Tensor:
    return rows if rows.shape[1] == size else F.pad(rows, (0, size - rows.shape[1]))  # zero columns: padded factors


def _mode_major(rows: Tensor, n1: int, n2: int, dtype: torch.dtype) -> Tensor:
    """Token rows (c, n1·n2) as X_t's columns stacked mode-major: (n2·c, n1) with row (q, t) = X_t[:, q] (one copy,
    cast to `dtype` on the way)."""
    blocks = rows.view(-1, n1, n2).permute(2, 0, 1)  # (c, n1·n2) -> (c, n1, n2) -> (n2, c, n1)
    return blocks.to(dtype, memory_format=torch.contiguous_format, copy=True).view(-1, n1)  # copy=True: views too


def _accumulate(total: Optional[Tensor], piece: Tensor, dtype: torch.dtype) -> Tensor:
    """total + piece summed in `dtype`; the first chunk's piece becomes the total (no zero-filled buffer)."""
    if total is None:
        return as_dtype(piece, dtype)
    return total.add_(piece)


def op_output(x: Tensor, A: Tensor, B: Tensor, base_out: Optional[Tensor]) -> tuple[Tensor, int]:
    """A Kronecker op's output y (..., m1·m2) for x (..., d_in): a new tensor the op writes through views, never a view
    itself (so it may be modified in place), and x's row count T. base_out must lie over x's leading axes, as
    `apply_kronecker_op` lays it out: its gradient is dY as it comes."""
    width = A.shape[1] * B.shape[1]
    if base_out is not None and base_out.shape != (*x.shape[:-1], width):
        raise ValueError(f"Kronecker op: base_out {tuple(base_out.shape)} must be {(*x.shape[:-1], width)} (x's "
                         f"leading axes, m1·m2 = {width}); reshape it, or call kernels.kronecker_linear, which does.")
    return x.new_empty(*x.shape[:-1], width), x.numel() // x.shape[-1]


def input_grad(grad: Tensor, tokens: int, x_shape: torch.Size) -> Tensor:
    """dX in x's layout, T rows of n1·n2 (any shape that reshapes so) → x's shape (..., d_in): the columns of the
    factors' zero padding (`pad_columns`) dropped."""
    d_in = x_shape[-1]
    if grad.numel() == tokens * d_in:  # no padding: one view (one op per layer and step counts at few tokens)
        return grad.reshape(x_shape)
    return grad.reshape(tokens, -1)[:, :d_in].reshape(x_shape)  # (T, n1·n2) -> (T, d_in) -> (..., d_in)


def save_for_factor_grads(ctx, a_first: bool, x: Tensor, a: Tensor, b: Tensor, intermediates: list[Tensor]) -> None:
    """`ctx.save_for_backward(x, a, b, *intermediates)` keeping x and the per-component intermediates only for the
    factor gradient that reads them (inputs x, A, B in that order): B first the intermediate X_t B_kᵀ feeds dA and x
    feeds dB; A first, A_k X_t feeds dB and x feeds dA. The others are saved as None."""
    need_a, need_b = ctx.needs_input_grad[1:3]
    keep_x, keep_intermediates = (need_a, need_b) if a_first else (need_b, need_a)
    ctx.save_for_backward(x if keep_x else None, a, b,
                          *(intermediates if keep_intermediates else [None] * len(intermediates)))


def stack_components(parts: list[Tensor]) -> Tensor:
    """R × (p, q) -> (R, p, q), contiguous (gradients in the factors' layout); a view for R = 1 when the part is
    contiguous (TeRA's factors)."""
    return parts[0].unsqueeze(0).contiguous() if len(parts) == 1 else torch.stack(parts)


def kronecker_factor_grads(x: Tensor, grad_y: Tensor, a: Tensor, b: Tensor, need_a: bool = True,
                           need_b: bool = True, dtype: Optional[torch.dtype] = None,
                           ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(dA (R, m1, n1), dB (R, m2, n2)) of y = x (Σ_k a_k ⊗ b_k)ᵀ cropped to grad_y's width:

        dA_k = Σ_t G_t B_k X_tᵀ,   dB_k = Σ_t G_tᵀ A_k X_t       (G_t = dY_t, X_t = row t of x as n1×n2)

    for x (T, d_in ≤ n1·n2), grad_y (T, d_out ≤ m1·m2); the GEMMs run in `dtype` (default grad_y's: x and the
    factors are cast to it) and are summed over chunks in fp32 (fp64 for fp64). Per chunk of c tokens x is laid out
    anew, mode-major: Xq (n2·c, n1) with row (q, t) = X_t[:, q] (one copy), while dY is read in place (unless cast) as
    G (c·m1, m2), row (t, i) = G_t[i, :], so every contraction is one 2-D GEMM:

        E_k = Xq A_kᵀ  (n2·c, m1),   dB_kᵀ = E_k viewed (n2, c·m1) @ G,
        H_k = B_kᵀ Gᵀ  (n2, c·m1),   dA_k = (H_k viewed (n2·c, m1))ᵀ @ Xq,

    2·(m·n2 + n·m1) MACs a token. When 2·(n·m2 + m·n1) is fewer (`init.tucker_cost.kronecker_grads_cost`) the same
    runs on the adjoint problem, x' = dY, dY' = x, A' = Aᵀ, B' = Bᵀ, whose gradients are dAᵀ and dBᵀ: dY is copied,
    x read in place. At TeRA's rectangular default layers that copies the narrower side; with every GEMM in the
    orientation MKL runs fastest it took 0.55-0.65× the time of the previous form, which laid out both x and dY, and
    about the same at square ones (benchmarks/results/kronecker_grads.md).
    """
    R = a.shape[0]
    dtype = grad_y.dtype if dtype is None else dtype
    acc = torch.promote_types(dtype, torch.float32)
    if R == 0:  # no components
        return (a.new_zeros(a.shape, dtype=acc) if need_a else None, b.new_zeros(b.shape, dtype=acc) if need_b else None)
    adjoint = kronecker_grads_cost(a.shape[1], a.shape[2], b.shape[1], b.shape[2])[2]
    if adjoint:
        x, grad_y, a, b = grad_y, x, a.transpose(1, 2), b.transpose(1, 2)
    a, b = as_dtype(a, dtype), as_dtype(b, dtype)
    _, p1, q1 = a.shape  # the run problem's A_k (p1, q1), B_k (p2, q2): (m1, n1), (m2, n2), or transposed
    _, p2, q2 = b.shape
    # B_kᵀ laid out row-major (a no-op where it already is): with B_kᵀ a transposed view MKL ran H_k = B_kᵀ Gᵀ
    # 1.8-2× slower at p2 = 24, q2 = 6 (the factor gradients 0.8× at MiniLM's 1536×384; no change at the other shapes)
    b_t = b.transpose(1, 2).contiguous()  # (R, q2, p2)
    grad_a: list[Optional[Tensor]] = [None] * R  # dA_k of the run problem (p1, q1)
    grad_bt: list[Optional[Tensor]] = [None] * R  # dB_kᵀ of the run problem (q2, p2)
    per_token = q1 * q2 + p1 * p2 + 2 * q2 * p1  # Xq, G (when cast), E_k, H_k
    chunks = token_chunks(x.shape[0], per_token, x.device, _GRAD_CHUNK_ELEMENTS)
    for start, stop in chunks:
        c = stop - start
        x_rows, g_rows = (x, grad_y) if len(chunks) == 1 else (x[start:stop], grad_y[start:stop])
        xq = _mode_major(pad_columns(x_rows, q1 * q2), q1, q2, dtype)  # (q2·c, q1)
        # (c, p1·p2) -> (c·p1, p2): a view of contiguous rows already in `dtype`, else one copy
        g = as_dtype(pad_columns(g_rows, p1 * p2), dtype).reshape(c * p1, p2)
        for k in range(R):
            if need_b:  # E_k = Xq A_kᵀ: (q2·c, q1) @ (q1, p1), viewed (q2, c·p1); dB_kᵀ = E_k @ G: (q2, p2)
                grad_bt[k] = _accumulate(grad_bt[k], (xq @ a[k].T).view(q2, c * p1) @ g, acc)
            if need_a:  # H_k = B_kᵀ Gᵀ: (q2, p2) @ (p2, c·p1), viewed (q2·c, p1); dA_k = H_kᵀ @ Xq: (p1, q1)
                grad_a[k] = _accumulate(grad_a[k], (b_t[k] @ g.T).view(q2 * c, p1).T @ xq, acc)
    if not chunks:  # no tokens: zero gradients
        grad_a = [torch.zeros(p1, q1, device=x.device, dtype=acc)] * R
        grad_bt = [torch.zeros(q2, p2, device=x.device, dtype=acc)] * R
    # (R, m1, n1) and (R, m2, n2): the adjoint's gradients are the transposes of the asked ones
    return (stack_components([grad.T for grad in grad_a] if adjoint else grad_a) if need_a else None,
            stack_components(grad_bt if adjoint else [grad.T for grad in grad_bt]) if need_b else None)


def kronecker_merged_weight(weight: Optional[Tensor], a: Tensor, b: Tensor) -> Tensor:
    """W + Σ_k a_k ⊗ b_k (or Σ_k a_k ⊗ b_k for weight None) as a new (m1·m2, n1·n2) tensor, no autograd, in the
    promoted dtype of W and the factors (fp32 factors on a bf16 W: fp32, as `tucker_linear_reference` forms it; an
    fp64 W stays fp64, so W + 0 is W bit for bit).

    One buffer: the first component's fused multiply-add reads W and writes it, the others accumulate in place
    (torch.kron and an add were 2-3× slower at 4096² and need one m·n temporary more).
    """
    R, m1, n1 = a.shape
    _, m2, n2 = b.shape
    n = n1 * n2
    with torch.no_grad():
        if R == 0:  # no components: W itself (a new tensor, in the promoted dtype) or zeros
            dtype = torch.promote_types(a.dtype, b.dtype)
            if weight is None:
                return torch.zeros(m1 * m2, n, dtype=dtype, device=a.device)
            return weight.to(torch.promote_types(weight.dtype, dtype), copy=True).reshape(m1 * m2, n)
        # W[(i, j), (p, q)] += A_k[i, p] B_k[j, q] over contiguous rows of n: A_k repeated over q and B_k tiled over p
        # first (copies of m1·n and m2·n). Broadcasting them over the (m1, m2, n1, n2) view instead ran 2-5× slower at
        # 1536×384 (n2 = 6) and up to 0.03 ms faster at 384² and 384×1536 (n2 = 16, 24).
        rows = a.unsqueeze(-1).expand(R, m1, n1, n2).reshape(R, m1, 1, n)  # (R, m1, n1) -> (R, m1, 1, n1·n2)
        cols = b.unsqueeze(2).expand(R, m2, n1, n2).reshape(R, 1, m2, n)  # (R, m2, n2) -> (R, 1, m2, n1·n2)
        if weight is None:
            merged = rows[0] * cols[0]
        else:  # added to W's (m1, m2, n) view
            merged = torch.addcmul(weight.reshape(m1, m2, n), rows[0], cols[0])
        for k in range(1, R):
            merged.addcmul_(rows[k], cols[k])
        return merged.reshape(m1 * m2, n)  # (m1, m2, n) -> (m, n)


class KroneckerMergedFunction(torch.autograd.Function):
    """y = x (W + Σ_k A_k ⊗ B_k)ᵀ + b with W and b frozen: one GEMM on the merged weight (formed in the promoted
    dtype of W and the factors, cast to x's), which is rebuilt in backward, never saved; dX = dY (W + ΔW), dA, dB by
    `kronecker_factor_grads` in the factors' precision, at least fp32 (no m×n dΔ). Saves x (when a factor needs a
    gradient), the factors and a reference to W."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, weight: Optional[Tensor],  # type: ignore[override]
                bias: Optional[Tensor]) -> Tensor:
        merged = as_dtype(kronecker_merged_weight(weight, A, B), x.dtype)
        ctx.save_for_backward(x if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) else None, A, B, weight)
        return F.linear(x, merged, as_dtype(bias, x.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, A, B, weight = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        with autocast_off(grad_y.device.type):  # a backward run inside autocast keeps the dtypes
            if need_x:
                grad_x = grad_y @ as_dtype(kronecker_merged_weight(weight, A, B), grad_y.dtype)  # (..., m) @ (m, n)
            if need_a or need_b:
                rows, grads = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])  # (..., d) -> (T, d)
                dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
                grad_a, grad_b = kronecker_factor_grads(rows, grads, A, B, need_a, need_b, dtype=dtype)
        return grad_x, as_dtype(grad_a, A.dtype), as_dtype(grad_b, B.dtype), None, None


_GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.linear.default)


def _gemm_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _GEMMS else CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_all_but_gemms():
    """Selective-checkpoint contexts for `kronecker_merged_linear` under torch.compile. Traced, the backward's rebuild
    of W + Δ merges with the forward's and the partitioner saves it (m×n per layer); in this region it is recomputed,
    as the eager op does, while GEMM outputs are kept (a later op, GELU or a norm, may need the layer's output, and
    recomputing it would cost a GEMM)."""
    return create_selective_checkpoint_contexts(_gemm_policy)


def kronecker_merged_linear(x: Tensor, A: Tensor, B: Tensor, weight: Optional[Tensor] = None,
                            bias: Optional[Tensor] = None) -> Tensor:
    """y = x (W + Σ_k A_k ⊗ B_k)ᵀ + b (`KroneckerMergedFunction`), for x (..., n1·n2), A (R, m1, n1), B (R, m2, n2),
    a frozen weight (m1·m2, n1·n2) or None (the adapter term alone) and bias (m1·m2,). Cheaper than the factored
    op when T is large next to the weight (the base GEMM absorbs Δ; only the factor gradients are extra)."""
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]:
        raise ValueError(f"kronecker_merged_linear: A {tuple(A.shape)} and B {tuple(B.shape)} must be (R, m1, n1) and "
                         "(R, m2, n2) with the same number R of components.")
    shape = (A.shape[1] * B.shape[1], A.shape[2] * B.shape[2])
    if x.shape[-1] != shape[1] or (weight is not None and tuple(weight.shape) != shape):
        raise ValueError(f"kronecker_merged_linear: x (..., {x.shape[-1]}) and weight "
                         f"{None if weight is None else tuple(weight.shape)} must tile the {shape[0]}×{shape[1]} "
                         f"Kronecker product of {tuple(A.shape[1:])}⊗{tuple(B.shape[1:])}; pad or use kronecker_linear.")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias)):
        raise ValueError("kronecker_merged_linear: weight and bias must be frozen (no gradient flows to them); use "
                         "kernels.tucker_linear or F.linear for a trainable base.")
    x = as_dtype(x, autocast_dtype(x))  # cast once, then one dtype through forward and backward
    with autocast_off(x.device.type):
        if torch.compiler.is_compiling():
            return checkpoint(KroneckerMergedFunction.apply, x, A, B, weight, bias, use_reentrant=False,
                              context_fn=_recompute_all_but_gemms)
        return KroneckerMergedFunction.apply(x, A, B, weight, bias)


class KroneckerBmmFunction(torch.autograd.Function):
    """y = base_out + x (Σ_k A_k ⊗ B_k)ᵀ as batched GEMMs over the T tokens whose factor operand is broadcast
    (batch stride 0), so no T-sized tensor is permuted in forward:

        B first:  Z_tᵀ = B_k X_tᵀ,  Y_t = A_k Z_t;   dX_t = Σ_k W_t B_k with W_t = A_kᵀ G_t,
                  dB_k = Σ_t W_tᵀ X_t,  dA_k = Σ_t G_t Z_tᵀ  (copies G as (m1, T·m2) once);
        A first:  U_t = A_k X_t,  Y_t = U_t B_kᵀ;    dX_t = Σ_k A_kᵀ V_t with V_t = G_t B_k,
                  dB_k = Σ_t G_tᵀ U_t,  dA_k = Σ_t V_t X_tᵀ  (copies X as (T·n2, n1) once, V per component).

    The GEMMs run in x's dtype (base_out, (..., m1·m2) or None, must be in it), dA and dB too (rounded once, then cast
    to the factors' dtype, as the einsum reference's autograd does). x (..., d_in) in, y (..., m1·m2) out, never a
    view (`apply_kronecker_op` crops it). Saved: B first, Z_tᵀ per component when A needs a gradient and x when B
    does; A first, U_t when B does and x when A does. Once differentiable, like the Triton op.
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, base_out: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        R, m1, n1 = A.shape
        _, m2, n2 = B.shape
        out, T = op_output(x, A, B, base_out)  # (..., m1·m2), written through a (T, m1, m2) view
        y = out.view(T, m1, m2)
        d_in = x.shape[-1]
        a, b = as_dtype(A, x.dtype), as_dtype(B, x.dtype)
        # (..., d_in) -> (T, n1·n2) -> (T, n1, n2)
        X = pad_columns(x.reshape(T, d_in), n1 * n2).reshape(T, n1, n2).contiguous()
        a_first = kronecker_a_first(m1, n1, m2, n2)
        base = None if base_out is None else base_out.reshape(T, m1, m2)  # read, never written
        if R == 0:  # base_out or zeros
            if base is None:
                y.zero_()
            else:
                y.copy_(base)
        saved = []
        for k in range(R):
            if a_first:  # U_t = A_k X_t: (T, m1, n1) @ (T, n1, n2) -> (T, m1, n2); Y_t = U_t B_kᵀ
                saved.append(torch.bmm(a[k].expand(T, m1, n1), X))
                left, right = saved[-1], b[k].mT.expand(T, n2, m2)
            else:  # Z_tᵀ = B_k X_tᵀ: (T, m2, n2) @ (T, n2, n1) -> (T, m2, n1); Y_t = A_k Z_t
                saved.append(torch.bmm(b[k].expand(T, m2, n2), X.mT))
                left, right = a[k].expand(T, m1, n1), saved[-1].mT
            if k:
                y.baddbmm_(left, right)
            elif base is None:
                torch.bmm(left, right, out=y)  # (T, m1, m2)
            else:
                torch.baddbmm(base, left, right, out=y)
        ctx.a_first, ctx.x_shape, ctx.dtypes = a_first, x.shape, (A.dtype, B.dtype)
        save_for_factor_grads(ctx, a_first, X, a, b, saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        X, a, b, *saved = ctx.saved_tensors
        need_x, need_a, need_b, need_base = ctx.needs_input_grad
        R, m1, n1 = a.shape
        _, m2, n2 = b.shape
        T = grad_y.numel() // (m1 * m2)
        grad_base = grad_y if need_base else None
        if R == 0:  # no components: zero gradients
            return (grad_y.new_zeros(ctx.x_shape) if need_x else None,
                    torch.zeros_like(a, dtype=ctx.dtypes[0]) if need_a else None,
                    torch.zeros_like(b, dtype=ctx.dtypes[1]) if need_b else None, grad_base)
        G = grad_y.reshape(T, m1, m2).contiguous()  # (..., m1·m2) -> (T, m1, m2)
        if need_a:  # dA contracts tokens with a column axis: G (B first) or X (A first) laid out so, once
            spread = X.mT.reshape(T * n2, n1) if ctx.a_first else G.transpose(0, 1).reshape(m1, T * m2)
        grad_x: Optional[Tensor] = None
        grad_a, grad_b = [], []
        for k in range(R):
            if ctx.a_first:
                V = torch.bmm(G, b[k].expand(T, m2, n2))  # V_t = G_t B_k: (T, m1, n2)
                if need_x:  # dX_t += A_kᵀ V_t: (T, n1, m1) @ (T, m1, n2)
                    step = torch.bmm(a[k].mT.expand(T, n1, m1), V)
                    grad_x = step if grad_x is None else grad_x.add_(step)
                if need_b:  # Σ_t G_tᵀ U_t: (m2, T·m1) @ (T·m1, n2)
                    grad_b.append(G.view(T * m1, m2).T @ saved[k].view(T * m1, n2))
                if need_a:  # Σ_t V_t X_tᵀ: (m1, T·n2) @ (T·n2, n1)
                    grad_a.append(V.transpose(0, 1).reshape(m1, T * n2) @ spread)
            else:
                W = torch.bmm(a[k].mT.expand(T, n1, m1), G).view(T * n1, m2)  # W_t = A_kᵀ G_t: (T·n1, m2)
                if need_x:  # dX_t += W_t B_k: (T·n1, m2) @ (m2, n2)
                    grad_x = W @ b[k] if grad_x is None else grad_x.addmm_(W, b[k])
                if need_b:  # Σ_t W_tᵀ X_t: (m2, T·n1) @ (T·n1, n2)
                    grad_b.append(W.T @ X.view(T * n1, n2))
                if need_a:  # Σ_t G_t Z_tᵀ: (m1, T·m2) @ (T·m2, n1)
                    grad_a.append(spread @ saved[k].view(T * m2, n1))
        if grad_x is not None:  # (T, n1, n2) -> (..., d_in)
            grad_x = input_grad(grad_x, T, ctx.x_shape)
        return (grad_x, as_dtype(stack_components(grad_a), ctx.dtypes[0]) if need_a else None,
                as_dtype(stack_components(grad_b), ctx.dtypes[1]) if need_b else None, grad_base)


def apply_kronecker_op(function: type[torch.autograd.Function], x: Tensor, A: Tensor, B: Tensor,
                       base_out: Optional[Tensor] = None, out_features: Optional[int] = None) -> Tensor:
    """`kernels.kronecker_linear` through a torch op that takes x (..., d_in) and base_out (..., m1·m2) or None and
    returns y (..., m1·m2), reshaping inside its node (`KroneckerBmmFunction`, `kronecker_gemm.KroneckerGemmFunction`):
    run in x's dtype or autocast's, base_out cast to it and added by the op when it covers y (else after the crop to
    d_out, here: the op's output is never a view, so it may be modified in place)."""
    width = A.shape[1] * B.shape[1]
    d_out = out_features or width
    dtype = autocast_dtype(x)
    with autocast_off(x.device.type):
        x = as_dtype(x, dtype)
        if base_out is not None:
            base_out = as_dtype(base_out, dtype)
            if base_out.shape[:-1] != x.shape[:-1]:  # same rows, other leading axes: x's
                base_out = base_out.reshape(*x.shape[:-1], d_out)
        inside = base_out is not None and d_out == width
        y = function.apply(x, A, B, base_out if inside else None)  # (..., m1·m2)
        if d_out < width:
            y = y[..., :d_out]
        if base_out is not None and not inside:
            y = base_out + y
    return y


def kronecker_linear_bmm(x: Tensor, A: Tensor, B: Tensor, base_out: Optional[Tensor] = None,
                         out_features: Optional[int] = None) -> Tensor:
    """`kernels.kronecker_linear`'s torch op on CUDA (`KroneckerBmmFunction` by `apply_kronecker_op`; shapes as
    `kronecker_linear` validates them). Its step runs 36-38 aten ops against the einsum reference's 78 (host time; a
    TorchDispatchMode around forward and `.backward()` with base_out, views included; 42-44 while x and y were
    reshaped outside the node). A TeRA layer's step on an H100 at T = 16384, on that earlier form, took 0.85× (4096²,
    B first), 0.94× (4096×11008, B first) and 0.99× (11008×4096, A first) of its time on the einsum path
    (benchmarks/results/tera_gpu.md). MKL's batched small GEMMs make it up to 1.8× slower on CPU."""
    return apply_kronecker_op(KroneckerBmmFunction, x, A, B, base_out, out_features)
