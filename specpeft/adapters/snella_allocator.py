"""SNELLA's inter-layer budget allocation (spec §3.2): AdaLoRA-style scores, cubic schedule, exact integer budgets.

Every optimizer step (after `optimizer.step()`, before `zero_grad()`), for θ ∈ {in_qs, out_qs} of each layer ℓ:

    I = |θ ⊙ ∇θ|,   Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|
    S_ℓ = mean(Ī ⊙ Ū)_in + mean(Ī ⊙ Ū)_out,   p_ℓ = S_ℓ / Σ S   (uniform when all are 0)

Global budget (kept entries) at time t, with V_init = Σ_ℓ k(s_init, N_ℓ), V_target = Σ_ℓ k(s_target, N_ℓ):

    V(t) = V_init                                                      t ≤ t_i
    V(t) = V_target                                                    t > T − t_f
    V(t) = V_target + ⌊(V_init − V_target) (1 − (t − t_i)/(T − t_f − t_i))³⌋   otherwise
                                                        (re-allocating at t when t % mask_interval = 0)

Per-layer budgets f_ℓ ≤ v_ℓ ≤ N_ℓ: every layer first gets its floor f_ℓ = k(max_layer_sparsity, N_ℓ) (0 in the
reference), the rest is shared in proportion to p_ℓ, capped and water-filled, and rounded by largest remainder in
exact rational arithmetic, so Σ v_ℓ = V(t) exactly (the reference keeps 1e7–1e8 totals in float32; pitfall 4).
Why a floor: a layer given 0 entries has K_eff = 0, so its factors get no gradient, its score decays to 0 and it
never wins budget back; `max_layer_sparsity < 1` keeps every layer in the competition.
Steps whose gradients are not finite (an AMP-skipped step) leave the scores untouched (pitfall 5).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from fractions import Fraction
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .bridge import AdapterLayer
from .snella import SNELLAAdapter, SNELLAConfig
from .snella_kernel import kept_count

try:  # the allocator is also a transformers TrainerCallback: Trainer(..., callbacks=[allocator])
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a dependency, but keep plain loops working without it
    _CallbackBase = object  # type: ignore[assignment,misc]


def cubic_budget(
    t: int, v_init: int, v_target: int, total_steps: int, init_warmup: int = 0, final_warmup: int = 0,
    mask_interval: int = 1,
) -> tuple[int, bool]:
    """(V(t), whether to re-allocate at t) for the cubic schedule above."""
    if t <= init_warmup:
        return v_init, False
    if t > total_steps - final_warmup:
        return v_target, True
    progress = Fraction(t - init_warmup, total_steps - final_warmup - init_warmup)
    return v_target + math.floor((v_init - v_target) * (1 - progress) ** 3), t % mask_interval == 0


def allocate_budget(
    scores: Sequence[float], volume: int, caps: Sequence[int], floors: Optional[Sequence[int]] = None
) -> list[int]:
    """Integer budgets v, Σ v = volume, floors_ℓ ≤ v_ℓ ≤ caps_ℓ, the part above the floors proportional to scores.

    Layers whose proportional share reaches their cap are saturated and the rest re-shared among the others
    (water-filling); the remaining shares are floored and the leftover units go to the largest fractional parts,
    ties to the lower index. Exact: scores enter as rationals, so no float rounding can break the sum.
    """
    floors = list(floors) if floors is not None else [0] * len(caps)
    if any(not 0 <= f <= c for f, c in zip(floors, caps)):
        raise ValueError("allocate_budget: every floor must lie in [0, cap].")
    if not sum(floors) <= volume <= sum(caps):
        raise ValueError(f"allocate_budget: volume {volume} is outside [Σ floors = {sum(floors)}, Σ caps = {sum(caps)}].")
    if any(s < 0 or not math.isfinite(s) for s in scores):
        raise ValueError("allocate_budget: scores must be finite and non-negative.")
    if any(floors):
        extra = allocate_budget(scores, volume - sum(floors), [c - f for c, f in zip(caps, floors)])
        return [f + e for f, e in zip(floors, extra)]
    alloc = [0] * len(caps)
    free = [i for i, cap in enumerate(caps) if cap > 0]
    remaining = volume
    while remaining > 0:
        weights = {i: Fraction(scores[i]) for i in free}
        total = sum(weights.values())
        if total == 0:
            weights, total = {i: Fraction(1) for i in free}, Fraction(len(free))
        quota = {i: remaining * weights[i] / total for i in free}
        saturated = [i for i in free if quota[i] >= caps[i]]
        if saturated:
            for i in saturated:
                alloc[i] = caps[i]
                remaining -= caps[i]
            free = [i for i in free if i not in set(saturated)]
            continue
        floors = {i: math.floor(quota[i]) for i in free}
        for i in free:
            alloc[i] = floors[i]
        leftover = remaining - sum(floors.values())  # < len(free): Σ of fractional parts
        by_remainder = sorted(free, key=lambda i: (-(quota[i] - floors[i]), i))
        for i in by_remainder[:leftover]:
            alloc[i] += 1  # quota < cap and cap is an integer, so floor + 1 ≤ cap
        remaining = 0
    return alloc


def snella_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, SNELLAAdapter]:
    """The SNELLA adapters named `adapter_name` in `model`, keyed by module name (peft's prefix removed)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            adapter = module.adapters[adapter_name]
            if isinstance(adapter, SNELLAAdapter):
                layers[name.removeprefix("base_model.model.")] = adapter
    return layers


class SNELLAAllocator(_CallbackBase):
    """Bi-level sparsity allocator for the SNELLA layers of a model.

    Plain loop::

        allocator = SNELLAAllocator(model, total_steps=num_steps)
        for t in range(num_steps):
            loss.backward(); optimizer.step()
            allocator.step(t + 1)          # scores from this step's grads, then the schedule at t + 1
            optimizer.zero_grad()

    transformers: `Trainer(..., callbacks=[SNELLAAllocator(model)])` (scores on `on_optimizer_step`, the schedule
    on `on_step_end` with `state.global_step`, or on `on_epoch_end` with `schedule_unit="epoch"` as the reference).

    Args:
        model: a model holding SNELLA adapters (e.g. the PeftModel from `get_adapter_model`).
        adapter_name: which adapter to allocate.
        target_sparsity, total_steps, init_warmup, final_warmup, mask_interval, beta1, beta2: override the
            adapter config's values (`SNELLAConfig`); total_steps may stay None until `on_train_begin`.
        init_sparsity: the sparsity V_init is computed from (default: the config's).
        max_layer_sparsity: no layer is sparsified beyond this (default: the config's; 1.0 = the reference).
        schedule_unit: "step" (t = optimizer steps) or "epoch" (the reference's per-epoch schedule).
    """

    def __init__(
        self, model: nn.Module, adapter_name: str = "default", *, target_sparsity: Optional[float] = None,
        total_steps: Optional[int] = None, init_warmup: Optional[int] = None, final_warmup: Optional[int] = None,
        mask_interval: Optional[int] = None, beta1: Optional[float] = None, beta2: Optional[float] = None,
        init_sparsity: Optional[float] = None, max_layer_sparsity: Optional[float] = None,
        schedule_unit: Literal["step", "epoch"] = "step",
    ) -> None:
        layers = snella_layers(model, adapter_name)
        if not layers:
            raise ValueError(
                f"SNELLAAllocator: the model has no SNELLA adapter named '{adapter_name}'. Wrap it first with "
                "specpeft.get_adapter_model(model, SNELLAConfig(...)) and pass that model (and adapter_name)."
            )
        # A frozen layer keeps its kept entries (its learned ΔW); the trainable layers compete for their own budget.
        self.layers = {name: layer for name, layer in layers.items() if layer.in_qs.requires_grad}
        if not self.layers:
            raise ValueError(f"SNELLAAllocator: every SNELLA layer of adapter '{adapter_name}' is frozen; nothing to "
                             "allocate. Make the adapter trainable (set_adapter) first.")
        config = getattr(model, "peft_config", {}).get(adapter_name)

        def pick(value: Any, field: str) -> Any:
            if value is not None:
                return value
            if config is None or not hasattr(config, field):
                raise ValueError(f"SNELLAAllocator: pass {field}= (no SNELLAConfig found on the model).")
            return getattr(config, field)

        self.target_sparsity = float(pick(target_sparsity, "target_sparsity"))
        self.init_sparsity = float(pick(init_sparsity, "init_sparsity"))
        self.total_steps = total_steps if total_steps is not None else getattr(config, "total_steps", None)
        self.init_warmup, self.final_warmup = int(pick(init_warmup, "init_warmup")), int(pick(final_warmup, "final_warmup"))
        self.mask_interval = int(pick(mask_interval, "mask_interval"))
        self.beta1, self.beta2 = float(pick(beta1, "beta1")), float(pick(beta2, "beta2"))
        if schedule_unit not in ("step", "epoch"):
            raise ValueError(f"SNELLAAllocator.schedule_unit={schedule_unit!r}: use 'step' or 'epoch'.")
        self.schedule_unit = schedule_unit
        self.max_layer_sparsity = float(pick(max_layer_sparsity, "max_layer_sparsity"))
        resolved = dict(target_sparsity=self.target_sparsity, init_sparsity=self.init_sparsity,
                        total_steps=self.total_steps, init_warmup=self.init_warmup, final_warmup=self.final_warmup,
                        mask_interval=self.mask_interval, beta1=self.beta1, beta2=self.beta2,
                        max_layer_sparsity=self.max_layer_sparsity)
        # the config's range checks on the values in force (overrides included), naming the option and its fix
        try:
            dataclasses.replace(config if isinstance(config, SNELLAConfig) else SNELLAConfig(), **resolved).validate()
        except ValueError as exc:
            raise ValueError(f"SNELLAAllocator (the adapter's config with the overrides passed here): {exc}") from None
        self.caps = [layer.numel for layer in self.layers.values()]
        self.floors = [kept_count(self.max_layer_sparsity, n) for n in self.caps]
        self.v_init = sum(kept_count(self.init_sparsity, n) for n in self.caps)
        self.v_target = sum(kept_count(self.target_sparsity, n) for n in self.caps)
        self.exp_sensitivity: dict[str, Tensor] = {}
        self.exp_uncertainty: dict[str, Tensor] = {}
        self.last_allocation: dict[str, int] = {}
        self.last_scores: dict[str, float] = {}

    # -- scores -------------------------------------------------------------------------------------------------

    def _factors(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}.{attr}", getattr(layer, attr)) for name, layer in self.layers.items()
                for attr in ("in_qs", "out_qs")]

    @torch.no_grad()
    def update_importance(self) -> bool:
        """Update Ī, Ū from the current `.grad`s; returns False (and changes nothing) if a gradient is not finite."""
        factors = [(key, p) for key, p in self._factors() if p.grad is not None]
        if not factors or not all(bool(torch.isfinite(p.grad).all()) for _, p in factors):
            return False
        for key, p in factors:
            importance = (p * p.grad).abs()
            if key not in self.exp_sensitivity:
                self.exp_sensitivity[key] = torch.zeros_like(p)
                self.exp_uncertainty[key] = torch.zeros_like(p)
            sens = self.exp_sensitivity[key].mul_(self.beta1).add_(importance, alpha=1 - self.beta1)
            self.exp_uncertainty[key].mul_(self.beta2).add_((importance - sens).abs_(), alpha=1 - self.beta2)
        return True

    def scores(self) -> dict[str, float]:
        """S_ℓ = mean(Ī ⊙ Ū) over in_qs + the same over out_qs (0 before any importance update)."""
        out = {}
        for name in self.layers:
            total = 0.0
            for attr in ("in_qs", "out_qs"):
                key = f"{name}.{attr}"
                if key in self.exp_sensitivity:
                    total += float((self.exp_sensitivity[key] * self.exp_uncertainty[key]).mean())
            out[name] = total
        return out

    # -- schedule and allocation --------------------------------------------------------------------------------

    def budget(self, t: int) -> tuple[int, bool]:
        """(V(t), re-allocate?) of the cubic schedule."""
        if self.total_steps is None:
            raise ValueError("SNELLAAllocator.total_steps is not set: pass total_steps= (or use it as a Trainer callback).")
        if self.total_steps <= self.init_warmup + self.final_warmup:
            raise ValueError(
                f"SNELLAAllocator: total_steps={self.total_steps} must exceed init_warmup + final_warmup "
                f"= {self.init_warmup + self.final_warmup}."
            )
        return cubic_budget(t, self.v_init, self.v_target, self.total_steps, self.init_warmup, self.final_warmup,
                            self.mask_interval)

    def allocate(self, volume: int) -> dict[str, int]:
        """Split `volume` kept entries over the layers by their scores and write each layer's `kept` buffer."""
        scores = self.scores()
        budgets = allocate_budget([scores[name] for name in self.layers], volume, self.caps, self.floors)
        for (name, layer), kept in zip(self.layers.items(), budgets):
            layer.set_kept(kept)
        self.last_scores = scores
        self.last_allocation = dict(zip(self.layers, budgets))
        return self.last_allocation

    def update(self, t: int) -> Optional[dict[str, int]]:
        """Apply the schedule at time t; returns the new per-layer kept counts when it re-allocated, else None."""
        volume, reallocate = self.budget(t)
        return self.allocate(volume) if reallocate else None

    def step(self, t: int) -> Optional[dict[str, int]]:
        """`update_importance()` then `update(t)`: one call per optimizer step in a plain loop."""
        self.update_importance()
        return self.update(t)

    def sparsities(self) -> dict[str, float]:
        """Current per-layer sparsity 1 − k_ℓ/N_ℓ (read from the layers' buffers)."""
        return {name: layer.sparsity for name, layer in self.layers.items()}

    # -- transformers.TrainerCallback ---------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.total_steps is None:
            # the Trainer's own counts: with max_steps set, args.num_train_epochs is not the epochs it runs
            if self.schedule_unit == "epoch" and state.num_train_epochs >= sys.maxsize:
                raise ValueError("SNELLAAllocator(schedule_unit='epoch'): the Trainer runs max_steps over a dataset "
                                 "without a length, so it counts no epochs. Use schedule_unit='step', or pass "
                                 "total_steps= (epochs).")
            epochs = math.ceil(state.num_train_epochs)
            self.total_steps = int(state.max_steps if self.schedule_unit == "step" else epochs)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.update_importance()  # gradients are still present: the Trainer zeroes them after this event

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.schedule_unit == "step":
            self.update(state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.schedule_unit == "epoch":
            self.update(int(round(state.epoch)))
