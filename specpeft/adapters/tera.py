"""TeRA: a Tucker tensor network with frozen shared random factors and trainable diagonal scalings (arXiv 2509.03234).

    Δ = α · unfold(𝒢 ×_1 Ũ_1 ×_2 … ×_N Ũ_N),   Ũ_k = diag(λ_k) U_k diag(μ_k),   W' = W + Δ,

with the d_out×d_in weight tensorized into N modes J_k = m_k n_k (init/tucker.py). The core 𝒢 and factors U_k are
frozen random tensors shared by every layer with the same mode structure (one tuner-level buffer per bucket,
regenerated from the seed on load unless `save_shared_factors`); only λ_k (J_k) and μ_k (R_k) are trained. rank(Δ)
reaches min(d_out, d_in) with Σ J_k + Σ R_k trainables. Parameterization, init and sizes are the PROPOSED
reconstruction of spec tera_fedsvd_snella.md §1.2–1.7 (the paper's code was not retrievable).

Init: λ_1 = 0, every other vector 1, so Δ = 0 exactly while ∂L/∂λ_1 ≠ 0 (Δ is multilinear; all-zero would freeze it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from contextlib import AbstractContextManager
from typing import Iterable, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from .._peft_compat import BufferDict
from ..init.tucker import TuckerShape, tucker_apply, tucker_to_tensor, unfold_view
from ..init.tucker_cost import CUDA_FACTORED_TOKENS, apply_macs, best_mode, edge_kronecker_cost, training_step_costs
from ..init.tucker_random import shared_random_factors, split_shared
from ..kernels._dispatch import as_dtype, autocast_dtype, autocast_off
from .base import FrozenBase, MethodAdapter
from .config import SpecPeftConfig
from .geometry import LayerGeometry
from .tera_function import GradPlan, TeRALinearFunction
from .tera_network import kronecker_network, scaled_factor
from .tera_pass import network_pass, pass_factors

ForwardMode = Literal["auto", "factored", "materialized"]
ScaleSides = Literal["mode", "rank", "both"]
_SHAPE_KEY = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class TeRAConfig(SpecPeftConfig):
    """TeRA options (spec §1.2–1.6; every default is PROPOSED there).

    Attributes:
        tensor_order: N, the number of modes each weight is tensorized into (≥ 2).
        rank: Tucker ranks over balanced modes (spec §1.3): an int r gives R_k = min(r, J_k); a list gives R_k per
            mode (clipped to J_k). None (default) also picks the modes: a last mode with R_N = 1, sized so that
            Δ = P ⊗ M_N is cheapest to apply per token while the trainables stay below rank(Δ), and R_k = min(16, J_k)
            on the balanced others (`init.tucker.wide_last_mode`; at 4096² modes (16, 8, 32)², 1,377 trainables).
            Δ is then applied without forming it (SoKA's Kronecker op) or, for many tokens, merged into W with the
            gradients of (P, M_N) contracted from dY and x; with R_N > 1 the merged path forms dΔ = dYᵀX, an extra
            m·n GEMM per step (≥ 1.5×, benchmarks/tera_speed.py), or projects through the factors. The default's
            splits keep rank(Δ) = min(d_out, d_in).
        mode_sizes: per weight shape "{d_out}x{d_in}" → [[m_1..m_N], [n_1..n_N]], overriding the default modes; with
            rank=None the mode whose contraction is cheapest gets R_k = 1 (`init.tucker.cheap_mode_ranks`).
        scale_sides: trainable diagonals on the "mode" side (λ_k, length J_k), the "rank" side (μ_k, length R_k), or
            "both" (VeRA's output-side + rank-side pattern).
        alpha: scalar s in W + s·Δ.
        projection_seed: seed of the shared random factors; a bucket's generator seed is
            sha256(f"{projection_seed}|{bucket}").
        save_shared_factors: write the shared factors into the adapter file. False (default): the file holds only the
            vectors and loading regenerates the factors from the seed, bit-identically on any machine running the same
            torch random-integer generator (init/tucker_random.py).
        forward_mode: "materialized" runs the base op on W + Δ (Δ rebuilt in backward, never saved); "factored"
            contracts x mode by mode without forming Δ; "auto" picks the cheaper by the batch's token count.
        batch_networks: form the factors of all same-shape layers in one autograd node at the start of each forward
            pass (adapters/tera_pass.py; same values, far fewer ops); False forms them layer by layer.
    """

    METHOD = "TERA"

    tensor_order: int = 3
    rank: Union[int, list[int], None] = None
    mode_sizes: dict[str, list[list[int]]] = field(default_factory=dict)
    scale_sides: ScaleSides = "both"
    alpha: float = 1.0
    projection_seed: int = 0
    save_shared_factors: bool = False
    forward_mode: ForwardMode = "auto"
    batch_networks: bool = True

    def validate(self) -> None:
        if self.tensor_order < 2:
            raise ValueError(f"TeRAConfig.tensor_order={self.tensor_order}: must be ≥ 2 (3 is the spec default).")
        ranks = [] if self.rank is None else [self.rank] if isinstance(self.rank, int) else list(self.rank)
        if isinstance(self.rank, list) and len(ranks) != self.tensor_order:
            raise ValueError(
                f"TeRAConfig.rank={self.rank}: a per-mode list needs tensor_order={self.tensor_order} entries; "
                "pass one int for all modes or fix the list."
            )
        if any(rank < 1 for rank in ranks):
            raise ValueError(f"TeRAConfig.rank={self.rank}: ranks must be ≥ 1.")
        for key, modes in self.mode_sizes.items():
            match = _SHAPE_KEY.match(key)
            if match is None:
                raise ValueError(f"TeRAConfig.mode_sizes key {key!r}: write the weight shape as '<d_out>x<d_in>'.")
            if len(modes) != 2 or len(modes[0]) != self.tensor_order or len(modes[1]) != self.tensor_order:
                raise ValueError(
                    f"TeRAConfig.mode_sizes[{key!r}]={modes}: give [[m_1..m_N], [n_1..n_N]] with N = tensor_order = "
                    f"{self.tensor_order}."
                )
            for side, dim in zip(modes, map(int, match.groups())):
                if min(side) < 1 or math.prod(side) != dim:
                    raise ValueError(f"TeRAConfig.mode_sizes[{key!r}]: {side} must be ≥ 1 with product {dim}.")

    def shape_for(self, d_out: int, d_in: int) -> TuckerShape:
        """Mode structure of a d_out×d_in weight: the `mode_sizes` override, else `TuckerShape.for_matrix` (balanced
        modes for explicit ranks, `wide_last_mode` for rank=None); ranks clipped to J_k."""
        override = self.mode_sizes.get(f"{d_out}x{d_in}")
        if override is None:
            return TuckerShape.for_matrix(d_out, d_in, self.tensor_order, self.rank)
        return TuckerShape.with_ranks(override[0], override[1], self.rank)


class TeRAAdapter(MethodAdapter):
    """Per-layer TeRA adapter: trainable diagonals `mode_scale_k` (J_k) / `rank_scale_k` (R_k), fp32.

    The shared core and factors live in one flat buffer per bucket of the tuner's store (`tera_shared.<adapter>`);
    the adapter keeps a plain reference to the store (not a submodule) and reads its bucket on every call, so the
    state dict and `.to()` see each bucket exactly once and every layer of a bucket reads the same tensor.
    """

    uses_shared_state = True
    # On an H100 the torch path (factored, see `use_factored`) trained as fast as the Triton kernels or faster at
    # every measured shape and T, with the einsum factored op and with its batched-GEMM successor (tera_gpu.md).
    triton_by_default = False

    def __init__(
        self,
        geometry: LayerGeometry,
        shape: TuckerShape,
        shared: Optional[BufferDict],
        seed: int,
        scale_sides: ScaleSides = "both",
        alpha: float = 1.0,
        forward_mode: ForwardMode = "auto",
        batch_networks: bool = True,
    ) -> None:
        super().__init__(geometry)
        if shape.out_features * shape.in_features != math.prod(geometry.weight_shape):
            raise ValueError(
                f"TeRA: modes {shape.out_modes}×{shape.in_modes} do not tile the {geometry.matrix_shape[0]}×"
                f"{geometry.matrix_shape[1]} weight; fix TeRAConfig.mode_sizes for this shape."
            )
        self.shape, self.alpha, self.forward_mode, self.scale_sides = shape, float(alpha), forward_mode, scale_sides
        self.bucket, self.batch_networks = shape.key, batch_networks
        if shared is None:  # standalone use (no tuner): own the store, registered so it moves with the adapter
            shared = BufferDict(persistent=False)
            self.private_shared = shared
        object.__setattr__(self, "_shared", shared)  # a reference, not a submodule: no duplicate keys, one .to()
        if self.bucket not in shared:
            shared[self.bucket] = shared_random_factors(seed, shape)
        self.unmerged_mode = best_mode(shape)  # the factored path's plan (init/tucker.py `tucker_apply`)
        self.projected_mode = best_mode(shape, unmerged=True)  # the unmerged mode of the "projected" gradients
        edge = edge_kronecker_cost(shape)  # R_N = 1: Δ = P ⊗ M_N, applied by kernels.kronecker_linear when cheaper
        self.edge_kronecker = edge is not None and edge[0] <= apply_macs(shape, self.unmerged_mode)[1]
        # R_N = 1 on a plain linear: the merged path may run W + P ⊗ M_N with Kronecker factor gradients (no dΔ)
        self.kronecker_capable = shape.ranks[-1] == 1 and geometry.is_plain_linear
        self._costs_by_tokens: dict[int, tuple[dict[str, float], GradPlan]] = {}  # `_step_costs` memo, by T
        self._views: Optional[tuple[Tensor, Tensor, list[Tensor]]] = None  # `_shared_views` memo: (bucket, core, U_k)
        sizes = {"mode": shape.mode_sizes, "rank": shape.ranks}
        for side in ("mode", "rank") if scale_sides == "both" else (scale_sides,):
            for k, size in enumerate(sizes[side]):
                self.register_parameter(f"{side}_scale_{k}", nn.Parameter(torch.ones(size)))
        self._vector_names = tuple(self._parameters)  # λ_1..λ_N, then μ_1..μ_N: the `vectors()` order
        self.vector_sizes = tuple(p.numel() for p in self._parameters.values())
        with torch.no_grad():
            self.vectors()[0].zero_()  # λ_1 = 0 (μ_1 if only rank-side): Δ = 0 with a non-zero gradient

    @classmethod
    def saves_shared_state(cls, config: TeRAConfig) -> bool:
        return config.save_shared_factors

    @classmethod
    def forward_pass(cls, adapters: Iterable[MethodAdapter]) -> AbstractContextManager[None]:
        return network_pass(adapters)  # one network node per bucket and pass (adapters/tera_pass.py)

    @classmethod
    def create(
        cls,
        geometry: LayerGeometry,
        config: TeRAConfig,
        weight: Tensor | None,
        record: dict | None,
        name: str = "",
        shared: Optional[BufferDict] = None,
    ) -> TeRAAdapter:
        # The init never reads the weight: the same construction serves a fresh init, a load and the meta device.
        if record and "out_modes" in record:
            shape = TuckerShape(tuple(record["out_modes"]), tuple(record["in_modes"]), tuple(record["ranks"]))
        else:
            try:
                shape = config.shape_for(*geometry.matrix_shape)
            except ValueError as exc:
                raise ValueError(f"TeRA layer '{name}': {exc}") from exc
        return cls(geometry, shape, shared, config.projection_seed, config.scale_sides, config.alpha,
                   config.forward_mode, config.batch_networks)

    def record(self) -> dict:
        return {key: list(getattr(self.shape, key)) for key in ("out_modes", "in_modes", "ranks")}

    # -- factors ------------------------------------------------------------------------------------------------

    @property
    def shared_buffer(self) -> Tensor:
        """This layer's bucket: the one flat [vec(𝒢) | vec(U_1) | … | vec(U_N)] tensor every same-shape layer reads."""
        return self._shared[self.bucket]

    def _shared_views(self) -> tuple[Tensor, list[Tensor]]:
        """The core and factors as views of this layer's bucket (`split_shared`), re-split only when the bucket tensor
        was replaced (`.to()`, a load) or the memo no longer views it (`.data =`, `share_memory_()`): each split is
        host time."""
        flat = self.shared_buffer
        if torch.compiler.is_compiling():  # traced, the split is free views; the memo's data_ptr test breaks graphs
            return split_shared(flat, self.shape)
        views = self._views
        if views is None or views[0] is not flat or views[1].data_ptr() != flat.data_ptr():
            self._views = (flat, *split_shared(flat, self.shape))
        return self._views[1], self._views[2]

    def vectors(self) -> list[nn.Parameter]:
        """The trainables in a fixed order: mode scales λ_1..λ_N, then rank scales μ_1..μ_N (those that exist)."""
        return [self._parameters[name] for name in self._vector_names]

    def _diagonals(self, vectors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(λ_1..λ_N, μ_1..μ_N) out of `vectors` (in `vectors()` order); a side that is not trained is an empty list."""
        order = self.shape.order
        lams = list(vectors[:order]) if self.scale_sides != "rank" else []
        mus = list(vectors[-order:]) if self.scale_sides != "mode" else []
        return lams, mus

    def _scaled(self, vectors: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
        """α·𝒢 and Ũ_k = diag(λ_k) U_k diag(μ_k) in `dtype`."""
        core, factors = self._shared_views()
        lams, mus = self._diagonals(vectors)
        none = [None] * self.shape.order
        scaled = [scaled_factor(as_dtype(f, dtype), as_dtype(lam, dtype), as_dtype(mu, dtype))
                  for f, lam, mu in zip(factors, lams or none, mus or none)]
        core = as_dtype(core, dtype)
        return (core * self.alpha if self.alpha != 1.0 else core), scaled

    def _build(self, *vectors: Tensor) -> Tensor:
        """α·Δ from the given vectors, in the vectors' dtype (fp32), normalized layout `(out, in/groups, *k)`."""
        core, factors = self._scaled(vectors, vectors[0].dtype)
        with autocast_off(core.device.type):  # under autocast each mode product would come out in its own dtype
            delta = unfold_view(tucker_to_tensor(core, factors), self.shape)  # (J_1..J_N) -> (m_1..m_N, n_1..n_N)
        return delta.reshape(self.geometry.weight_shape)  # (m_1.., n_1..) -> (out, in/g, *k)

    def delta_weight(self) -> Tensor:
        return self._build(*self.vectors())

    # -- forward ------------------------------------------------------------------------------------------------

    def _step_costs(self, tokens: int) -> tuple[dict[str, float], GradPlan]:
        """Training-step cost of each path beyond the frozen base op (`init.tucker_cost.training_step_costs`:
        "factored", the merged-weight plans "dense", "projected" and, when `kronecker_capable`, "kronecker"), and the
        cheapest merged plan. Memoized per T: every forward asks (`use_factored`, then `grad_plan`)."""
        if tokens not in self._costs_by_tokens:
            costs = training_step_costs(self.shape, tokens, self.unmerged_mode, self.projected_mode,
                                        self.edge_kronecker, self.kronecker_capable)
            plans = [plan for plan in costs if plan != "factored"]
            best = plans[0]
            for plan in plans[1:]:  # a loop, not min(key=): torch.compile traces it without a graph break
                if costs[plan] < costs[best]:
                    best = plan
            self._costs_by_tokens[tokens] = costs, best
        return self._costs_by_tokens[tokens]

    def use_factored(self, tokens: int, device_type: str = "cpu") -> bool:
        """Factored contraction (Δ never formed) iff its estimated training-step cost is below the cheapest merged
        plan's (`_step_costs`, calibrated on CPU). On CUDA a plain linear with the default layout (Δ = P ⊗ M_N applied
        to x, `edge_kronecker`; merged alternative `kernels.kronecker_merged_linear`) is factored from
        `CUDA_FACTORED_TOKENS` tokens and merged below, as measured on an H100 (`init.tucker_cost`); other layers,
        whose merged alternatives were not timed there, keep the cost model. The choice depends on T and the device
        only, never on grad mode, so a model runs the same path (and bits) in training, eval and after reload."""
        if self.geometry.kind != "linear" or self.forward_mode == "materialized":
            return False
        if self.forward_mode == "factored":
            return True
        if device_type == "cuda" and self.edge_kronecker and self.kronecker_capable:
            return tokens >= CUDA_FACTORED_TOKENS
        costs, plan = self._step_costs(tokens)
        return costs["factored"] < costs[plan]

    def grad_plan(self, tokens: int) -> GradPlan:
        """The cheapest merged-weight plan (`_step_costs`): "dense" dΔ, "projected", or (R_N = 1 on a plain linear)
        "kronecker", run by `kernels.kronecker_merged_linear`."""
        return self._step_costs(tokens)[1]

    def may_use_kronecker_factors(self) -> bool:
        """Some token count runs a path that reads `_kronecker_factors` (factored with `edge_kronecker`, the merged
        "kronecker" plan with `kronecker_capable`; no convolution, no Triton kernel): a forward pass forms them."""
        factored = self.forward_mode != "materialized" and self.edge_kronecker
        reads = factored or (self.forward_mode != "factored" and self.kronecker_capable)
        return reads and self.geometry.kind == "linear" and self.kernel_path(self.shared_buffer) != "triton"

    def _kronecker_factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) with α·Δ = Σ_r A_r ⊗ B_r split at the last mode, in the vectors' dtype, as one autograd node
        (`tera_network.kronecker_network`: a layer's tiny network costs ops, not FLOPs)."""
        pair = pass_factors(self)  # formed with the rest of the bucket at the start of this forward pass
        if pair is not None:
            return pair
        core, factors = self._shared_views()
        return kronecker_network(self.shape, core, factors, *self._diagonals(self.vectors()), alpha=self.alpha)

    def _factored_delta(self, x: Tensor, base_out: Optional[Tensor] = None) -> Tensor:
        """x Δᵀ (+ base_out) without forming Δ: Δ = P ⊗ M_N by the Kronecker op when R_N = 1 makes that cheaper
        (`kernels.kronecker_linear`), else `tucker_apply`."""
        if self.edge_kronecker:
            A, B = self._kronecker_factors()
            return kernels.kronecker_linear(x, A, B, base_out=base_out, backend="torch")
        vectors = tuple(self.vectors())
        core, factors = self._scaled(vectors, vectors[0].dtype)  # the small network in the vectors' fp32
        dtype = autocast_dtype(x)  # the T-sized contractions in x's dtype, or autocast's
        with autocast_off(x.device.type):
            flat = as_dtype(x, dtype).reshape(-1, self.shape.in_features)  # (..., n) -> (T, n)
            out = tucker_apply(flat, as_dtype(core, dtype), [as_dtype(f, dtype) for f in factors], self.shape,
                               self.unmerged_mode)  # (T, m)
        out = out.reshape(*x.shape[:-1], self.shape.out_features)
        return out if base_out is None else base_out + out

    def _merged_kronecker(self, x: Tensor, module: Optional[nn.Module]) -> Tensor:
        """x (W + Δ)ᵀ + b (module given) or x Δᵀ as one GEMM on the merged weight, Δ = P ⊗ M_N built by a fused
        multiply-add and rebuilt in backward; the gradients of (P, M_N) are contracted from dY and x, no m×n dΔ
        (`kernels.kronecker_merged_linear`; P, M_N formed from the vectors by `_kronecker_factors`)."""
        A, B = self._kronecker_factors()  # in the vectors' fp32 (autocast off inside), as the gradients are
        weight, bias = (None, None) if module is None else (module.weight, module.bias)
        return kernels.kronecker_merged_linear(x, A, B, weight, bias)

    def _explicit_backward_ok(self, base: FrozenBase) -> bool:
        """The closed-form linear backward applies: a linear base whose frozen weight and bias take no gradient."""
        module = base.module
        frozen = not any(p.requires_grad for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                         if isinstance(p, Tensor))
        linear_op = base.geometry.quantized or base.geometry.standard_forward or base.geometry.fan_in_fan_out
        return base.geometry.kind == "linear" and linear_op and frozen

    def forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        fused = self._fused_tucker(x, base)
        if fused is not None:
            return fused
        tokens = x.numel() // self.shape.in_features
        if self.use_factored(tokens, x.device.type):
            return self._factored_delta(x, base(x))
        if self._explicit_backward_ok(base):
            plan = self.grad_plan(tokens)
            if plan == "kronecker":  # a base whose weight cannot be substituted adds x Δᵀ, as with the other plans
                if base.geometry.is_plain_linear:
                    return self._merged_kronecker(x, base.module)
                return base(x) + self._merged_kronecker(x, None)
            if base.geometry.quantized:  # the weight can only be read, not substituted: add x Δᵀ to the base output
                return base(x) + TeRALinearFunction.apply(x, self, base, False, plan, *self.vectors())
            return TeRALinearFunction.apply(x, self, base, True, plan, *self.vectors())
        # Convolutions and custom linear subclasses: autograd through the base op, with Δ recomputed in backward.
        run = lambda inp, *vecs: base.forward_with_delta(inp, self._build(*vecs))  # noqa: E731
        return checkpoint(run, x, *self.vectors(), use_reentrant=False)

    def delta_forward(self, x: Tensor, base: FrozenBase) -> Tensor:
        tokens = x.numel() // self.shape.in_features
        if self.use_factored(tokens, x.device.type):
            return self._factored_delta(x)
        if self.geometry.kind == "linear":
            plan = self.grad_plan(tokens)
            if plan == "kronecker":
                return self._merged_kronecker(x, None)
            return TeRALinearFunction.apply(x, self, base, False, plan, *self.vectors())
        run = lambda inp, *vecs: base.apply_weight(inp, self._build(*vecs))  # noqa: E731
        return checkpoint(run, x, *self.vectors(), use_reentrant=False)

    # -- fused kernel path (specpeft.kernels, issue 9) ------------------------------------------------------------

    def _fused_tucker(self, x: Tensor, base: FrozenBase) -> Optional[Tensor]:
        """x (W + α·Δ)ᵀ + b by `kernels.tucker_linear` (Triton: W + Δ written tile by tile, or the Kronecker kernel
        for few tokens) when the kernels dispatch to Triton and the base is a plain nn.Linear; None otherwise.

        The scaled network (α·𝒢, Ũ_k) is formed by torch autograd, so the kernel's core/factor gradients flow on to
        λ and μ. "auto" leaves the materialized/factored choice to the kernel's own (GPU) break-even rule.
        """
        if not self.geometry.is_plain_linear:
            return None
        module = base.module
        if self.kernel_path(x, module.weight) != "triton":
            return None
        core, factors = self._scaled(tuple(self.vectors()), torch.float32)
        return kernels.tucker_linear(x, core, factors, self.shape.out_modes, self.shape.in_modes,
                                     weight=module.weight, bias=module.bias, mode=self.forward_mode, backend="triton")

    def num_trainable(self) -> int:
        return sum(self.vector_sizes)

    def extra_repr(self) -> str:
        return (f"out_modes={self.shape.out_modes}, in_modes={self.shape.in_modes}, ranks={self.shape.ranks}, "
                f"sides={self.scale_sides}, alpha={self.alpha}, forward_mode={self.forward_mode}")


REGISTRATION = dict(
    name="tera",
    config_cls=TeRAConfig,
    adapter_cls=TeRAAdapter,
    description="TeRA: Tucker network with frozen shared random factors; trains per-layer diagonal scalings.",
)
