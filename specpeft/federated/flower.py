"""FedSVD on Flower (Message API, flwr ≥ 1.21): a strategy and a ClientApp over the same core as `simulate`.

    strategy = FedSVDStrategy(make_server("fedsvd", initial_state), clients_per_round=3, seed=0)
    app = make_client_app(model_fn, dataset_fn, loss_fn, LocalTraining(), dp=DPConfig(6.0), rounds=20)
    result = strategy.start(grid, state_to_arrays(initial_state), num_rounds=20)   # any Flower Grid

The server broadcasts A and B (A changes every round), clients return ΔB (and ΔA for FedAvg-LoRA) with
`num-examples`, and `aggregate_train` hands them to the core server, which rejects malformed or non-finite
updates and error replies with a logged reason. Per-client DP state (σ and the accountant history) lives in
`context.state`, as Flower rebuilds client objects every round. Flower's own DP wrappers are not used: they give
update-level DP, not FedSVD's example-level DP-SGD (spec §2.11).

`flwr.simulation.run_simulation` needs Ray (its only backend); `InProcessGrid` / `run_in_process` deliver the
messages to the ClientApp in this process instead, with the same strategy and ClientApp objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from torch import Tensor, nn
from torch.utils.data import Dataset

from .client import ClientPrivacy, DPConfig, LocalTraining, LossFn, planned_steps, require_active, train_client
from .server import ClientUpdate, LoRAServer, Rejection, weighted_mean
from .simulate import client_sampler, client_seed
from .state import LoRAState, find_lora_factors

__all__ = [
    "BUDGET_EXHAUSTED",
    "FedSVDStrategy",
    "InProcessGrid",
    "arrays_to_state",
    "make_client_app",
    "run_in_process",
    "state_to_arrays",
]

logger = logging.getLogger("specpeft.federated")

_SEP = "::"  # layer key and factor name in ArrayRecord keys: "<layer>::A", "<layer>::dB"
_PRIVACY_KEY = "specpeft-privacy"
_PRIVATE_METRICS = ("loss", "clip_fraction")  # functions of the private examples that DP-SGD's ε does not cover
_SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the sender id of server messages
BUDGET_EXHAUSTED = 1001  # Error.code of a node that refuses a round its privacy budget cannot pay for (not Flower's)


def _transportable(tensor: Tensor) -> Tensor:
    """On the CPU, bf16 widened to fp32 (exactly): ArrayRecord goes through numpy, which has no bf16; `write_state`
    and the server cast back to the model's dtype."""
    tensor = tensor.detach().cpu()
    return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def state_to_arrays(state: LoRAState) -> ArrayRecord:
    """{layer: (A, B)} as an ArrayRecord with keys '<layer>::A' and '<layer>::B'."""
    arrays = {}
    for key, (a, b) in state.items():
        arrays[f"{key}{_SEP}A"], arrays[f"{key}{_SEP}B"] = _transportable(a), _transportable(b)
    return ArrayRecord(torch_state_dict=arrays)


def arrays_to_state(arrays: ArrayRecord) -> LoRAState:
    """Inverse of `state_to_arrays`."""
    tensors = arrays.to_torch_state_dict()
    layers = sorted({name.rsplit(_SEP, 1)[0] for name in tensors})
    return {key: (tensors[f"{key}{_SEP}A"], tensors[f"{key}{_SEP}B"]) for key in layers}


def _update_to_content(update: ClientUpdate) -> RecordDict:
    arrays = {f"{key}{_SEP}dB": _transportable(delta) for key, delta in update.delta_B.items()}
    for key, delta in (update.delta_A or {}).items():
        arrays[f"{key}{_SEP}dA"] = _transportable(delta)
    metrics = MetricRecord({"num-examples": update.num_examples, **update.metrics})
    return RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "metrics": metrics})


def _content_to_update(client_id: int, content: RecordDict) -> ClientUpdate:
    """Parse a train reply; raises KeyError/ValueError/TypeError on a malformed one."""
    tensors = content["arrays"].to_torch_state_dict()
    metrics = dict(content["metrics"])
    delta_B = {name.rsplit(_SEP, 1)[0]: t for name, t in tensors.items() if name.endswith(f"{_SEP}dB")}
    delta_A = {name.rsplit(_SEP, 1)[0]: t for name, t in tensors.items() if name.endswith(f"{_SEP}dA")}
    num_examples = metrics.pop("num-examples")
    return ClientUpdate(client_id, num_examples, delta_B, delta_A or None, {k: float(v) for k, v in metrics.items()})


class FedSVDStrategy(FedAvg):
    """Flower strategy running a core `LoRAServer` (FedSVD, FFA-LoRA or FedAvg-LoRA).

    The core server's state is authoritative: `configure_train` broadcasts it (the `arrays` Flower passes in are
    the previous round's output of `aggregate_train`, i.e. the same state). Clients are sampled with
    `client_sampler(seed)` over the sorted node ids, so with `InProcessGrid` a run matches `simulate` exactly.

    Args:
        server: the protocol's core server.
        clients_per_round: m nodes sampled per round.
        seed: seeds the sampling.
    """

    def __init__(self, server: LoRAServer, clients_per_round: int, seed: int = 0) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # the global model is evaluated server-side (Strategy.start's evaluate_fn)
            min_train_nodes=clients_per_round,
            min_available_nodes=clients_per_round,
        )
        self.server = server
        self.clients_per_round = clients_per_round
        self._sampler = client_sampler(seed)
        self._partition: dict[int, int] = {}
        self.rejections: dict[int, list[Rejection]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) < self.clients_per_round:
            raise RuntimeError(
                f"FedSVDStrategy: {len(node_ids)} nodes are connected but clients_per_round={self.clients_per_round}."
            )
        self._partition = {node: index for index, node in enumerate(node_ids)}
        picked = sorted(int(i) for i in self._sampler.choice(len(node_ids), size=self.clients_per_round, replace=False))
        config["server-round"] = server_round
        config["train-A"] = self.server.trains_A
        arrays = state_to_arrays(self.server.broadcast())
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [node_ids[i] for i in picked], MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        updates: list[ClientUpdate] = []
        dropped: list[Rejection] = []
        crashed: list[str] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self._partition.get(node, node)
            if reply.has_error():
                dropped.append(Rejection(client, f"dropped out: {reply.error.reason}"))
                if reply.error.code != BUDGET_EXHAUSTED:
                    crashed.append(reply.error.reason)
                continue
            try:
                updates.append(_content_to_update(client, reply.content))
            except (KeyError, ValueError, TypeError) as exc:
                dropped.append(Rejection(client, f"malformed reply: {type(exc).__name__}: {exc}"))
        for rejection in dropped:
            logger.warning("round %d: client %s %s", server_round, rejection.client_id, rejection.reason)
        if crashed and not updates:  # the run goes on (a deployment may recover), but not silently
            logger.error("round %d: every client failed; the global state is unchanged. First error: %s",
                         server_round, crashed[0])
        report = self.server.aggregate(updates)
        self.rejections[server_round] = dropped + report.rejected
        metrics = {"accepted": float(len(report.weights)), "rejected": float(len(self.rejections[server_round]))}
        if report.weights and all("loss" in u.metrics for u in updates):  # DP nodes keep their loss (see below)
            losses = {u.client_id: u.metrics["loss"] for u in updates}
            metrics["train-loss"] = weighted_mean(losses, report.weights)
        epsilons = [u.metrics["epsilon"] for u in updates if u.client_id in report.weights and "epsilon" in u.metrics]
        if epsilons:
            metrics["epsilon-max"] = max(epsilons)  # over this round's clients; each value is that client's total
        return state_to_arrays(self.server.state), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def summary(self) -> None:
        logger.info("FedSVDStrategy: %s server, %d clients per round", self.server.name, self.clients_per_round)


def make_client_app(
    model_fn: Callable[[Context], nn.Module],
    dataset_fn: Callable[[Context], Dataset],
    loss_fn: LossFn,
    local: LocalTraining,
    *,
    dp: Optional[DPConfig] = None,
    rounds: Optional[int] = None,
    participation: float = 1.0,
    seed: int = 0,
    adapter_name: str = "default",
    private_metrics: bool = False,
) -> ClientApp:
    """A ClientApp whose `train` runs `train_client` on the node's partition.

    Args:
        model_fn: context -> the model with LoRA layers (may be one shared instance in-process).
        dataset_fn: context -> this node's dataset (e.g. from `context.node_config["partition-id"]`).
        loss_fn, local, dp: as in `simulate`.
        rounds, participation: the run's length and m/K, which DP calibration plans for (`rounds` is required with
            `dp`). A node whose next round would spend more than the target ε (`ClientPrivacy.refusal`) answers
            with an error of code `BUDGET_EXHAUSTED` instead of training.
        seed: the run seed; local training uses `client_seed(seed, round, partition-id)`. With `dp`, the Poisson
            sampling and the noise come from `os.urandom` unless `dp.seeded_noise=True` (the server knows `seed`).
        adapter_name: the LoRA adapter to train.
        private_metrics: with `dp`, also send the train loss and clip fraction. They are computed from the private
            examples outside the DP guarantee, so by default they stay on the node (logged at INFO); the reply
            carries ΔB, num-examples (spec §2.13), ε, σ, steps and timings.
    """
    if dp is not None and rounds is None:
        raise ValueError("make_client_app: rounds is required with dp: σ is calibrated so that the run's rounds spend "
                         "at most dp.target_epsilon; pass the num_rounds given to strategy.start.")
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        model = model_fn(context)
        dataset = dataset_fn(context)
        config = message.content["config"]
        privacy = _restore_privacy(context, dp, len(dataset), local, rounds or 1, participation)
        refusal = privacy.refusal(local.steps) if privacy is not None else None
        if refusal is not None:
            return Message(error=Error(code=BUDGET_EXHAUSTED, reason=refusal), reply_to=message)
        require_active(model, adapter_name, "make_client_app")
        update = train_client(
            model,
            find_lora_factors(model, adapter_name),
            arrays_to_state(message.content["arrays"]),
            dataset,
            loss_fn,
            local,
            client_id=partition,
            train_A=bool(config["train-A"]),
            privacy=privacy,
            seed=client_seed(seed, int(config["server-round"]), partition),
            secret_noise=dp is not None and not dp.seeded_noise,
        )
        if privacy is not None and not private_metrics:
            kept = {name: update.metrics.pop(name) for name in _PRIVATE_METRICS if name in update.metrics}
            logger.info("node %d, round %s (kept on the node under DP): %s", partition, config["server-round"], kept)
        if privacy is not None:
            history = privacy.accountant.history
            context.state[_PRIVACY_KEY] = ConfigRecord(
                {
                    "noise-multiplier": privacy.noise_multiplier,
                    "sigma": [h[0] for h in history],
                    "q": [h[1] for h in history],
                    "steps": [h[2] for h in history],
                }
            )
        return Message(content=_update_to_content(update), reply_to=message)

    return app


def _restore_privacy(
    context: Context, dp: Optional[DPConfig], num_examples: int, local: LocalTraining, rounds: int, participation: float
) -> Optional[ClientPrivacy]:
    if dp is None:
        return None
    saved = context.state[_PRIVACY_KEY] if _PRIVACY_KEY in context.state else None
    sigma = float(saved["noise-multiplier"]) if saved is not None else None  # calibrated once, on the first round
    privacy = ClientPrivacy(dp, num_examples, local.batch_size, planned_steps(dp, local, rounds, participation), sigma)
    if saved is not None:
        privacy.accountant.history = list(zip(saved["sigma"], saved["q"], saved["steps"]))
    return privacy


class InProcessGrid(Grid):
    """A Grid that delivers every message to a ClientApp in this process, one node after another.

    Each node keeps its own `Context` (node_config {"partition-id": k}, a persistent `state`) across rounds, as
    a Flower SuperNode does. A ClientApp exception becomes an error reply, as on a real deployment.

    Args:
        client_app: the ClientApp every node runs.
        num_nodes: K.
        run_id: the run id stamped on messages.
        fail: optional (round, partition) -> bool; True makes that node crash in that round (to test drop-outs).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_id: int = 1,
        fail: Optional[Callable[[int, int], bool]] = None,
    ) -> None:
        self.client_app = client_app
        self.fail = fail
        self._run = Run.create_empty(run_id)
        self._contexts = {
            node: Context(run_id, node, node_config={"partition-id": k}, state=RecordDict(), run_config={})
            for k, node in enumerate(range(1000, 1000 + num_nodes))
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: Optional[float] = None
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for index, message in enumerate(messages):
            message_id = f"{len(self._replies)}-{index}"
            context = self._contexts[message.metadata.dst_node_id]
            partition = int(context.node_config["partition-id"])
            server_round = int(message.content["config"]["server-round"]) if "config" in message.content else 0
            try:
                if self.fail is not None and self.fail(server_round, partition):
                    raise ConnectionError(f"node {partition} went offline (simulated)")
                self._replies[message_id] = self.client_app(message, context)
            except Exception as exc:  # a crashing node answers with an error, as a real SuperNode does
                error = Error(code=0, reason=f"{type(exc).__name__}: {exc}")
                self._replies[message_id] = Message(error=error, reply_to=message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(
    strategy: FedSVDStrategy,
    client_app: ClientApp,
    num_nodes: int,
    num_rounds: int,
    evaluate_fn: Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]] = None,
    fail: Optional[Callable[[int, int], bool]] = None,
) -> Result:
    """`strategy.start` on an `InProcessGrid` (Flower's Strategy loop, no Ray, no network)."""
    grid = InProcessGrid(client_app, num_nodes, fail=fail)
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    # Message() stamps the sender from TaskIdentity, which a ServerApp process sets; set it for this process.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = grid.run.run_id, _SUPERLINK_NODE_ID, 1
    try:
        initial = state_to_arrays(strategy.server.state)
        return strategy.start(grid, initial, num_rounds=num_rounds, evaluate_fn=evaluate_fn)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
