"""In-process federated simulation over K clients: sampling, Dirichlet non-IID splits, fault handling, metrics.

Each round t: sample m of K clients (a seeded RNG independent of everything else, so every method sees the same
clients), broadcast the global (A, B), train each client locally (sequentially, on one model instance), pass the
updates through the server (which rejects malformed or non-finite ones, never averaging them in), evaluate the
global model and report loss, accuracy and the ε spent so far.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .client import (
    ClientPrivacy,
    DPConfig,
    LocalTraining,
    LossFn,
    calibrate_noise,
    planned_steps,
    require_active,
    sample_rate_for,
    train_client,
)
from .refactor import RefactorMethod
from .server import ClientId, ClientUpdate, Method, Rejection, make_server, weighted_mean
from .state import LoRAFactors, LoRAState, clone_state, find_lora_factors, read_state, write_state

__all__ = [
    "RoundMetrics",
    "SimulationResult",
    "UpdateHook",
    "classification_eval",
    "client_sampler",
    "client_seed",
    "dirichlet_split",
    "simulate",
]

logger = logging.getLogger("specpeft.federated")

UpdateHook = Callable[[int, ClientId, ClientUpdate], Optional[ClientUpdate]]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class RoundMetrics:
    """What one round did and measured.

    Attributes:
        round: 1-based round number.
        sampled: clients asked to train.
        weights: aggregation weight of each accepted client (Σ = 1).
        rejected: clients left out, with the reason (drop-out, exception, budget, invalid update).
        train_loss: |D_k|-weighted mean of the accepted clients' local training loss.
        eval: eval_fn's metrics of the global model after aggregation (empty on rounds not evaluated).
        epsilon: max cumulative ε over all clients (None without DP).
        refactored: whether the server re-factorized A this round.
        seconds: wall time of the round.
    """

    round: int
    sampled: list[ClientId]
    weights: dict[ClientId, float]
    rejected: list[Rejection]
    train_loss: float
    eval: dict[str, float]
    epsilon: Optional[float]
    refactored: bool
    seconds: float

    @property
    def accuracy(self) -> Optional[float]:
        return self.eval.get("accuracy")


@dataclass
class SimulationResult:
    """A finished run: per-round history, the final global state and every client's privacy state."""

    method: str
    history: list[RoundMetrics]
    state: LoRAState
    initial_eval: dict[str, float] = field(default_factory=dict)
    privacy: dict[ClientId, ClientPrivacy] = field(default_factory=dict)

    def final_eval(self) -> dict[str, float]:
        """Metrics of the last evaluated round."""
        for metrics in reversed(self.history):
            if metrics.eval:
                return metrics.eval
        return self.initial_eval


def dirichlet_split(
    labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float = 0.5, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Non-IID label split: for each class c, its examples go to clients in proportions p_c ~ Dir(α·1_K).

    Small α gives clients few dominant classes; α → ∞ gives IID. Redraws (up to 100 times) until every client
    holds at least `min_size` examples.

    Returns:
        K sorted index arrays that partition range(len(labels)).
    """
    labels = np.asarray(labels)
    if num_clients < 1 or not alpha > 0 or min_size < 1 or min_size * num_clients > len(labels):
        raise ValueError(
            f"dirichlet_split: need num_clients ≥ 1 (got {num_clients}), alpha > 0 (got {alpha}) and "
            f"1 ≤ min_size, min_size·num_clients ≤ {len(labels)} examples (got {min_size}·{num_clients})."
        )
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            ids = np.flatnonzero(labels == cls)
            rng.shuffle(ids)
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(ids)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(ids, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"dirichlet_split: no split with ≥ {min_size} examples per client in 100 draws at alpha={alpha}; raise alpha "
        "or lower min_size/num_clients."
    )


def classification_eval(
    dataset: Dataset, logits_fn: Callable[[nn.Module, Sequence[Tensor]], tuple[Tensor, Tensor]], batch_size: int = 64
) -> EvalFn:
    """An eval_fn computing accuracy and mean cross-entropy; logits_fn(model, batch) -> (logits, labels)."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        correct, loss, count = 0, 0.0, 0
        for batch in DataLoader(dataset, batch_size=batch_size):
            logits, labels = logits_fn(model, batch)
            loss += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
        return {"accuracy": correct / count, "loss": loss / count}

    return evaluate


def _evaluate(model: nn.Module, eval_fn: EvalFn) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in eval_fn(model).items()}
    finally:
        model.train(was_training)


def client_seed(seed: int, round_: int, client: int) -> int:
    """The local-training seed of `client` in round `round_` (shared by `simulate` and the Flower client app)."""
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0])


def client_sampler(seed: int) -> np.random.Generator:
    """The RNG that picks each round's clients (`rng.choice(K, m, replace=False)`), independent of training."""
    return np.random.default_rng([seed, 0])


def _make_privacy(
    dp: DPConfig, datasets: Sequence[Dataset], local: LocalTraining, rounds: int, participation: float
) -> dict[ClientId, ClientPrivacy]:
    steps = planned_steps(dp, local, rounds, participation)
    privacy: dict[ClientId, ClientPrivacy] = {}
    sigma_cache: dict[float, float] = {}  # clients with the same sample rate share σ (each search takes ~1 s)
    for k, data in enumerate(datasets):
        q = sample_rate_for(len(data), local.batch_size)
        if q not in sigma_cache:
            sigma_cache[q] = calibrate_noise(dp, q, steps)
        privacy[k] = ClientPrivacy(dp, len(data), local.batch_size, steps, noise_multiplier=sigma_cache[q])
    return privacy


def describe_privacy(privacy: dict[ClientId, ClientPrivacy]) -> dict[str, float]:
    """Max cumulative ε over clients and the σ range, for per-round reporting."""
    if not privacy:
        return {}
    sigmas = [p.noise_multiplier for p in privacy.values()]
    return {"epsilon": max(p.epsilon() for p in privacy.values()), "sigma_min": min(sigmas), "sigma_max": max(sigmas)}


def simulate(
    model: nn.Module,
    client_datasets: Sequence[Dataset],
    loss_fn: LossFn,
    *,
    method: Method = "fedsvd",
    rounds: int = 10,
    clients_per_round: Optional[int] = None,
    local: LocalTraining = LocalTraining(),
    dp: Optional[DPConfig] = None,
    refactor_every: int = 1,
    svd_warmup: int = 0,
    refactor_method: RefactorMethod = "qr",
    eval_fn: Optional[EvalFn] = None,
    eval_every: int = 1,
    factors: Optional[LoRAFactors] = None,
    adapter_name: str = "default",
    initial_state: Optional[LoRAState] = None,
    dropout_rate: float = 0.0,
    update_hook: Optional[UpdateHook] = None,
    seed: int = 0,
    progress: bool = True,
) -> SimulationResult:
    """Run `rounds` rounds of FedSVD / FFA-LoRA / FedAvg-LoRA over `client_datasets` on one model instance.

    The initial global state is `initial_state`, or the model's current LoRA factors; at the end the model's
    factors hold the final global state.

    Args:
        model: a model with LoRA layers (e.g. `get_adapter_model(base, FedSVDConfig(...))`).
        client_datasets: one dataset per client (e.g. `Subset`s from `dirichlet_split`).
        loss_fn: (model, batch) -> mean loss.
        method: "fedsvd", "ffa" or "fedavg".
        rounds: number of rounds T.
        clients_per_round: m clients sampled uniformly without replacement each round (default: all K).
        local: local training settings.
        dp: DP-SGD settings, or None for non-private training.
        refactor_every, svd_warmup, refactor_method: FedSVD's schedule and route (see `FedSVDServer`).
        eval_fn: model -> metrics (e.g. `classification_eval`), run under no_grad in eval mode.
        eval_every: evaluate every this many rounds (and always after the last one).
        factors: the model's (A, B) parameters; found by `find_lora_factors(model, adapter_name)` by default.
        adapter_name: the adapter to federate.
        initial_state: start from this {layer: (A, B)} (e.g. the same init for every method compared).
        dropout_rate: probability that a sampled client silently drops out of a round.
        update_hook: (round, client, update) -> update or None; sees every update before the server, to
            simulate a lossy or faulty network (None = the update never arrives).
        seed: seeds client sampling, drop-outs, local shuffling and DP noise (unless `dp.seeded_noise=False`).
        progress: show a progress bar.
    """
    num_clients = len(client_datasets)
    m = num_clients if clients_per_round is None else clients_per_round
    if not 1 <= m <= num_clients:
        raise ValueError(f"simulate: clients_per_round={clients_per_round} must be in [1, {num_clients}].")
    empty = [k for k, data in enumerate(client_datasets) if len(data) == 0]
    if empty:
        raise ValueError(f"simulate: clients {empty} have no examples; leave them out of client_datasets.")
    if rounds < 1 or eval_every < 1 or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"simulate: rounds={rounds}, eval_every={eval_every} must be ≥ 1, dropout_rate in [0, 1).")
    require_active(model, adapter_name, "simulate")
    factors = factors if factors is not None else find_lora_factors(model, adapter_name)
    options = dict(refactor_every=refactor_every, svd_warmup=svd_warmup, refactor_method=refactor_method)
    if initial_state is not None:
        write_state(factors, initial_state)
    server = make_server(method, read_state(factors), **(options if method == "fedsvd" else {}))
    privacy = _make_privacy(dp, client_datasets, local, rounds, m / num_clients) if dp is not None else {}
    sampler, dropper = client_sampler(seed), np.random.default_rng([seed, 1])
    initial_eval = _evaluate(model, eval_fn) if eval_fn is not None else {}
    history: list[RoundMetrics] = []
    bar = tqdm(range(1, rounds + 1), desc=f"{method}{' +DP' if dp else ''}", disable=not progress, leave=False)
    for round_ in bar:
        start = time.perf_counter()
        sampled = sorted(int(k) for k in sampler.choice(num_clients, size=m, replace=False))
        drops = dropper.random(m) < dropout_rate
        broadcast = server.broadcast()
        updates, dropped, errors = [], [], []
        for k, drop in zip(sampled, drops):
            client_privacy = privacy.get(k)
            reason = "dropped out (simulated)" if drop else (
                client_privacy.refusal(local.steps) if client_privacy is not None else None)
            if reason is None:
                try:
                    update: Optional[ClientUpdate] = train_client(
                        model, factors, broadcast, client_datasets[k], loss_fn, local, client_id=k,
                        train_A=server.trains_A, privacy=privacy.get(k), seed=client_seed(seed, round_, k),
                        secret_noise=dp is not None and dp.seeded_noise is False,
                    )
                    update = update_hook(round_, k, update) if update_hook is not None else update
                    reason = None if update is not None else "dropped out (no update received)"
                except Exception as exc:  # a crashing client is a drop-out; its partial work is discarded
                    errors.append(exc)
                    reason = f"dropped out: {type(exc).__name__}: {exc}"
            if reason is None:
                updates.append(update)
            else:
                dropped.append(Rejection(k, reason))
                logger.warning("round %d: client %d %s", round_, k, reason)
        if errors and not updates:
            raise RuntimeError(f"simulate: every client of round {round_} failed (first error chained).") from errors[0]
        report = server.aggregate(updates)
        write_state(factors, server.state)
        do_eval = eval_fn is not None and (round_ % eval_every == 0 or round_ == rounds)
        loss = weighted_mean({u.client_id: u.metrics["loss"] for u in updates}, report.weights)
        metrics = RoundMetrics(
            round=round_,
            sampled=sampled,
            weights=report.weights,
            rejected=dropped + report.rejected,
            train_loss=loss,
            eval=_evaluate(model, eval_fn) if do_eval else {},
            epsilon=describe_privacy(privacy).get("epsilon"),
            refactored=report.refactored,
            seconds=time.perf_counter() - start,
        )
        history.append(metrics)
        postfix = {"loss": f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in metrics.eval.items()}}
        if metrics.epsilon is not None:
            postfix["eps"] = f"{metrics.epsilon:.2f}"
        bar.set_postfix(postfix)
    return SimulationResult(method, history, clone_state(server.state), initial_eval, privacy)
