"""Client side of federated LoRA: local training of B (or A and B), privately with DP-SGD through Opacus or not.

One local round on client k, from the broadcast (A, B) (spec §2.3, §2.5):

    non-private:  B ← B − η ∇_B L(batch)                                         (`steps` times)
    DP-SGD:       g_i = ∇_B ℓ_i,  ḡ_i = g_i · min(1, C/‖g_i‖),
                  B ← B − η (Σ_{i∈batch} ḡ_i + N(0, σ²C² I)) / (q·|D_k|)           (`steps` times)

with Poisson sampling at rate q = 1/⌈|D_k|/batch_size⌉ (Opacus' rule) and flat clipping over all trainable
factors; σ and the cumulative ε are the client's `privacy.ClientPrivacy`. The client returns ΔB = B_k − B (and ΔA
for FedAvg-LoRA). Opacus is imported lazily: it is the optional `specpeft[federated]` extra.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .privacy import ClientPrivacy, DPConfig, calibrate_noise, sample_rate_for
from .server import ClientId, ClientUpdate
from .state import LoRAFactors, LoRAState, read_state, write_state

__all__ = [
    "ClientPrivacy",
    "DPConfig",
    "LocalTraining",
    "LossFn",
    "calibrate_noise",
    "planned_steps",
    "require_active",
    "sample_rate_for",
    "train_client",
]

LossFn = Callable[[nn.Module, Sequence[Tensor]], Tensor]  # (model, batch) -> mean loss over the batch


@dataclass(frozen=True)
class LocalTraining:
    """Local optimization of one round (the reference code: 10 SGD steps at lr 0.5, fresh optimizer every round).

    Attributes:
        steps: optimizer steps per round (DP: one Poisson-sampled logical batch each).
        batch_size: batch size (DP: the expected batch size, q·|D_k|).
        lr: learning rate.
        optimizer: "sgd" or "adamw"; re-created every round, so no state outlives a re-factorization.
        momentum: SGD momentum.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
    """

    steps: int = 10
    batch_size: int = 16
    lr: float = 0.5
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"LocalTraining: steps={self.steps} and batch_size={self.batch_size} must be ≥ 1.")
        if not self.lr > 0:
            raise ValueError(f"LocalTraining.lr={self.lr} must be > 0.")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"LocalTraining.optimizer={self.optimizer!r} must be 'sgd' or 'adamw'.")


def planned_steps(dp: DPConfig, local: LocalTraining, rounds: int, participation: float) -> int:
    """Steps σ is calibrated for: steps·rounds ("all_rounds") or ⌈steps·rounds·participation⌉ ("expected")."""
    steps = local.steps * rounds
    return max(1, math.ceil(steps * participation)) if dp.calibrate_for == "expected" else steps


def _batch_len(batch: Sequence[Tensor]) -> int:
    return len(batch[0])


def _make_optimizer(params: list[nn.Parameter], local: LocalTraining) -> torch.optim.Optimizer:
    if local.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=local.lr, weight_decay=local.weight_decay)
    return torch.optim.SGD(params, lr=local.lr, momentum=local.momentum, weight_decay=local.weight_decay)


def _cycle(loader: DataLoader, steps: int):
    """`steps` batches, restarting the loader as often as needed."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def require_active(model: nn.Module, adapter_name: str, caller: str) -> None:
    """Raise unless `adapter_name` is among the model's active adapters (a peft model's `active_adapters`; a model
    without that attribute is taken as is): an inactive adapter's factors never see a gradient."""
    active = getattr(model, "active_adapters", None)
    if callable(active):  # transformers' PeftAdapterMixin has a method where peft has a property
        active = active()
    if active is not None and adapter_name not in active:
        raise ValueError(
            f"{caller}: adapter '{adapter_name}' is not active (active: {list(active)}), so its factors would get no "
            f"gradient. Call model.set_adapter('{adapter_name}') first."
        )


def _freeze_norm_statistics(model: nn.Module) -> None:
    """Batch/instance norms back to eval mode: their running statistics are client data that is never aggregated
    (one client's would leak into the shared model), and under DP-SGD batch statistics couple the examples, so
    per-sample clipping would no longer bound one example's influence."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.eval()


def train_client(
    model: nn.Module,
    factors: LoRAFactors,
    state: LoRAState,
    dataset: Dataset,
    loss_fn: LossFn,
    local: LocalTraining,
    *,
    client_id: ClientId = 0,
    train_A: bool = False,
    privacy: Optional[ClientPrivacy] = None,
    seed: int = 0,
    secret_noise: bool = False,
) -> ClientUpdate:
    """Run one local round from the broadcast `state` and return the factor differences.

    Only the factors train: every other parameter of `model` is frozen for the round (it is shared across
    simulated clients and never aggregated), and the previous `requires_grad` flags are restored afterwards. Norm
    layers keep their running statistics (eval mode), and the global RNG (dropout) is forked and seeded with `seed`,
    so a round is reproducible whatever ran before it.

    Args:
        model: the model holding the LoRA layers (one instance may serve every simulated client).
        factors: its (A, B) parameters per layer (`find_lora_factors`).
        state: the broadcast global state, written into `factors` first.
        dataset: the client's examples; items are tuples of tensors that `loss_fn` understands.
        loss_fn: (model, batch) -> mean loss over the batch.
        local: steps, batch size, optimizer.
        client_id: reported back with the update.
        train_A: FedAvg-LoRA trains A too; FFA-LoRA and FedSVD keep A frozen.
        privacy: this client's DP state; None trains without DP.
        seed: seeds shuffling/Poisson sampling, the DP noise and the model's own randomness (dropout).
        secret_noise: with DP, draw the Poisson sampling and the noise from a generator seeded by `os.urandom`
            instead of `seed` (whoever knows `seed` could replay the noise and subtract it from ΔB).

    Returns:
        The update: ΔB (and ΔA), |D_k| and metrics loss, steps, seconds_per_step / cpu_seconds_per_step (the
        optimization loop's wall / process-CPU time per step, without set-up and accounting), and with DP
        epsilon, noise_multiplier, clip_fraction (share of per-sample gradients that were clipped).
    """
    if len(dataset) == 0:
        raise ValueError(f"train_client: client {client_id} has no examples; leave it out of the run.")
    write_state(factors, state)
    before = read_state(factors)
    trainable = [b for _, b in factors.values()] + ([a for a, _ in factors.values()] if train_A else [])
    flags = {p: p.requires_grad for p in model.parameters()}
    secret = privacy is not None and secret_noise
    generator = torch.Generator().manual_seed(secrets.randbits(64) if secret else seed)
    modes = {module: module.training for module in model.modules()}
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        model.train()
        _freeze_norm_statistics(model)
        optimizer = _make_optimizer(trainable, local)
        loader = DataLoader(dataset, batch_size=local.batch_size, shuffle=privacy is None, generator=generator)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if privacy is None:
                losses, extra = _train_plain(model, loader, loss_fn, optimizer, local.steps)
            else:
                losses, extra = _train_private(
                    model, loader, loss_fn, optimizer, local.steps, trainable, privacy, generator, secret
                )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for module, training in modes.items():
            module.training = training
    after = read_state(factors)
    delta_B = {key: after[key][1] - before[key][1] for key in factors}
    delta_A = {key: after[key][0] - before[key][0] for key in factors} if train_A else None
    metrics = {"loss": sum(losses) / len(losses) if losses else float("nan"), "steps": float(local.steps), **extra}
    return ClientUpdate(client_id, len(dataset), delta_B, delta_A, metrics)


def _train_plain(
    model: nn.Module, loader: DataLoader, loss_fn: LossFn, optimizer: torch.optim.Optimizer, steps: int
) -> tuple[list[float], dict[str, float]]:
    losses = []
    start, cpu = time.perf_counter(), time.process_time()
    for batch in _cycle(loader, steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    timing = {
        "seconds_per_step": (time.perf_counter() - start) / steps,
        "cpu_seconds_per_step": (time.process_time() - cpu) / steps,
    }
    return losses, timing


def _train_private(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    steps: int,
    trainable: list[nn.Parameter],
    privacy: ClientPrivacy,
    generator: torch.Generator,
    secret: bool,
) -> tuple[list[float], dict[str, float]]:
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Expected here: hooks on lora_B whose input needs no gradient, and (a seeded run) no secure RNG on purpose.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if not secret:
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=privacy.dp.accountant)
        engine.accountant = privacy.accountant  # the hook make_private attaches steps this persistent accountant
        hooks, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.dp.max_grad_norm,
            poisson_sampling=True,  # the Poisson sampler draws from loader.generator, i.e. `generator`
            wrap_model=False,
            noise_generator=generator,
        )
        clip = privacy.dp.max_grad_norm
        losses: list[float] = []
        clipped = seen = 0
        start, cpu = time.perf_counter(), time.process_time()
        try:
            for batch in _cycle(dp_loader, steps):
                dp_optimizer.zero_grad(set_to_none=True)
                if _batch_len(batch) == 0:
                    # An empty Poisson batch is still a DP step: it must add noise and be accounted.
                    for p in trainable:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                else:
                    loss = loss_fn(model, batch)
                    loss.backward()
                    losses.append(float(loss.detach()))
                    norms = torch.stack([p.grad_sample.reshape(len(p.grad_sample), -1).norm(dim=1) for p in trainable])
                    per_sample = norms.norm(dim=0)  # (n_params, batch) -> (batch,): flat clipping norm
                    clipped += int((per_sample > clip).sum())
                    seen += per_sample.numel()
                dp_optimizer.step()
            timing = {
                "seconds_per_step": (time.perf_counter() - start) / steps,
                "cpu_seconds_per_step": (time.process_time() - cpu) / steps,
            }
        finally:
            dp_optimizer.zero_grad(set_to_none=True)
            hooks.cleanup()
        extra = {
            **timing,
            "epsilon": privacy.epsilon(),
            "noise_multiplier": privacy.noise_multiplier,
            "clip_fraction": clipped / seen if seen else float("nan"),
        }
        return losses, extra
