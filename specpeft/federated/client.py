"""Client side of federated LoRA: local training of B (or A and B), privately with DP-SGD through Opacus or not.

One local round on client k, from the broadcast (A, B) (spec §2.3, §2.5):

    non-private:  B ← B − η ∇_B L(batch)                                         (`steps` times)
    DP-SGD:       g_i = ∇_B ℓ_i,  ḡ_i = g_i · min(1, C/‖g_i‖),
                  B ← B − η (Σ_{i∈batch} ḡ_i + N(0, σ²C² I)) / (q·|D_k|)           (`steps` times)

with Poisson sampling at rate q = 1/⌈|D_k|/batch_size⌉ (Opacus' rule) and flat clipping over all trainable
factors. σ is calibrated once per client so that the planned number of steps spends (ε, δ) under the chosen
accountant; each client's accountant persists across rounds, so the ε it reports is cumulative (the reference code
builds a fresh engine every round and logs per-round ε, spec §2.13 item 2). The client returns ΔB = B_k − B
(and ΔA for FedAvg-LoRA). Opacus is imported lazily: it is the optional `specpeft[federated]` extra.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

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

logger = logging.getLogger("specpeft.federated")

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


@dataclass(frozen=True)
class DPConfig:
    """Example-level DP-SGD on every client (Opacus).

    Attributes:
        target_epsilon: ε each client may spend over the whole run.
        target_delta: δ (choose < 1/|D_k|; the reference uses 1e-5).
        max_grad_norm: per-sample clipping norm C (flat over all trainable factors; reference 2.0).
        accountant: "prv" (Opacus' default, the reference's) or "rdp".
        calibrate_for: "all_rounds" calibrates σ for steps·rounds (a client sampled every round stays within ε);
            "expected" for steps·rounds·participation (the reference code), and a client whose next round would
            exceed ε is then left out of that round.
        noise_multiplier: a fixed σ instead of calibration (ε is still accounted and reported).
        epsilon_tolerance: precision of the σ search (Opacus' `get_noise_multiplier`).
    """

    target_epsilon: float = 6.0
    target_delta: float = 1e-5
    max_grad_norm: float = 2.0
    accountant: Literal["prv", "rdp"] = "prv"
    calibrate_for: Literal["all_rounds", "expected"] = "all_rounds"
    noise_multiplier: Optional[float] = None
    epsilon_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0 or not 0 < self.target_delta < 1:
            raise ValueError(
                f"DPConfig: target_epsilon={self.target_epsilon} must be > 0 and target_delta={self.target_delta} in "
                "(0, 1), e.g. DPConfig(target_epsilon=6, target_delta=1e-5)."
            )
        if not self.max_grad_norm > 0:
            raise ValueError(f"DPConfig.max_grad_norm={self.max_grad_norm} must be > 0 (reference: 2.0).")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"DPConfig.accountant={self.accountant!r} must be 'prv' or 'rdp'.")
        if self.calibrate_for not in ("all_rounds", "expected"):
            raise ValueError(f"DPConfig.calibrate_for={self.calibrate_for!r} must be 'all_rounds' or 'expected'.")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"DPConfig.noise_multiplier={self.noise_multiplier} must be ≥ 0 or None (calibrate).")


def planned_steps(dp: DPConfig, local: LocalTraining, rounds: int, participation: float) -> int:
    """Steps σ is calibrated for: steps·rounds ("all_rounds") or ⌈steps·rounds·participation⌉ ("expected")."""
    steps = local.steps * rounds
    return max(1, math.ceil(steps * participation)) if dp.calibrate_for == "expected" else steps


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson rate q = 1/⌈|D|/batch_size⌉, exactly what Opacus' `make_private` derives from the data loader."""
    return 1.0 / math.ceil(num_examples / batch_size)


def calibrate_noise(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """σ such that `steps` DP-SGD steps at rate q spend at most (ε, δ) under `dp.accountant` (Opacus' search)."""
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    return _search_noise(dp.target_epsilon, dp.target_delta, sample_rate, steps, dp.accountant, dp.epsilon_tolerance)


@functools.lru_cache(maxsize=256)
def _search_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, tolerance: float
) -> float:
    # Cached: a PRV search costs ~10 accountant evaluations (seconds), and runs comparing methods repeat it.
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=tolerance,
        )
    )


class ClientPrivacy:
    """One client's DP state across rounds: σ, q and an Opacus accountant whose history accumulates.

    Args:
        dp: the DP settings.
        num_examples: |D_k|.
        batch_size: expected batch size.
        planned_steps: steps σ is calibrated for (see `DPConfig.calibrate_for`).
        noise_multiplier: an already calibrated σ for these (q, steps), to skip the search.
    """

    def __init__(
        self,
        dp: DPConfig,
        num_examples: int,
        batch_size: int,
        planned_steps: int,
        noise_multiplier: Optional[float] = None,
    ) -> None:
        from opacus.accountants import create_accountant

        self.dp = dp
        self.sample_rate = sample_rate_for(num_examples, batch_size)
        self.planned_steps = planned_steps
        if noise_multiplier is None:
            noise_multiplier = calibrate_noise(dp, self.sample_rate, planned_steps)
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = create_accountant(mechanism=dp.accountant)
        self._epsilons: dict[tuple[tuple[float, float, int], ...], float] = {}

    @property
    def steps_taken(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self) -> float:
        """Cumulative ε spent so far at δ = target_delta (0 before the first step)."""
        return self._epsilon_of(tuple(self.accountant.history))

    def epsilon_after(self, steps: int) -> float:
        """ε this client would have spent after `steps` more steps (the accountant itself is untouched)."""
        history = list(self.accountant.history)
        if history and history[-1][:2] == (self.noise_multiplier, self.sample_rate):
            history[-1] = (self.noise_multiplier, self.sample_rate, history[-1][2] + steps)  # as Opacus merges steps
        else:
            history.append((self.noise_multiplier, self.sample_rate, steps))
        return self._epsilon_of(tuple(history))

    def refusal(self, steps: int) -> Optional[str]:
        """Why this client may not take `steps` more steps (None: it may). A calibrated σ (no fixed
        `DPConfig.noise_multiplier`) promises ε ≤ target_epsilon, so a round that would spend more is refused, under
        either `calibrate_for`: "expected" plans for fewer steps than a client sampled every round takes, and a run
        longer than the `rounds` σ was calibrated for would overrun "all_rounds" too."""
        if self.dp.noise_multiplier is not None or self.epsilon_after(steps) <= self.dp.target_epsilon * (1 + 1e-6):
            return None
        return f"privacy budget exhausted (ε={self.epsilon():.3f} of {self.dp.target_epsilon})"

    def _epsilon_of(self, history: tuple[tuple[float, float, int], ...]) -> float:
        # Memoized: one PRV evaluation takes ~1 s, and ε is reported every round for every client.
        if not history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return math.inf  # no noise: no finite ε
        if history not in self._epsilons:
            self._epsilons[history] = _epsilon(self.dp.accountant, list(history), self.dp.target_delta)
        return self._epsilons[history]


def _epsilon(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=mechanism)
    accountant.history = history
    try:
        return float(accountant.get_epsilon(delta))
    except (OverflowError, ValueError) as exc:
        if mechanism == "rdp":
            raise
        # PRV's discretization fails for extreme (σ, q, steps); RDP is a valid (looser) upper bound there.
        logger.warning("PRV accountant failed (%s); reporting the RDP bound instead.", exc)
        return _epsilon("rdp", history, delta)


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

    Returns:
        The update: ΔB (and ΔA), |D_k| and metrics loss, steps, seconds_per_step / cpu_seconds_per_step (the
        optimization loop's wall / process-CPU time per step, without set-up and accounting), and with DP
        epsilon, noise_multiplier, clip_fraction (share of per-sample gradients that were clipped).
    """
    write_state(factors, state)
    before = read_state(factors)
    trainable = [b for _, b in factors.values()] + ([a for a, _ in factors.values()] if train_A else [])
    flags = {p: p.requires_grad for p in model.parameters()}
    generator = torch.Generator().manual_seed(seed)
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
                    model, loader, loss_fn, optimizer, local.steps, trainable, privacy, generator
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
) -> tuple[list[float], dict[str, float]]:
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Expected here: no secure RNG (seeded runs), and hooks on lora_B whose input needs no gradient.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
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
