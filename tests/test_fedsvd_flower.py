"""FedSVD on Flower: the strategy and ClientApp, driven through Flower's own Strategy.start loop in-process.

`flwr.simulation.run_simulation` needs Ray, which is not a dependency; `run_in_process` feeds the same strategy and
ClientApp through an in-process Grid. The run must equal the core `simulate` with the same seed.
"""

import logging
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import specpeft
from specpeft.federated import DPConfig, LocalTraining, find_lora_factors, make_server, read_state, simulate

pytest.importorskip("flwr", reason="Flower is the optional extra specpeft[federated]")
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from specpeft.federated.flower import (  # noqa: E402
    BUDGET_EXHAUSTED,
    FedSVDStrategy,
    arrays_to_state,
    make_client_app,
    run_in_process,
    state_to_arrays,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    return specpeft.get_adapter_model(base, specpeft.FedSVDConfig(r=4, lora_alpha=4, target_modules=["0", "2"]))


def _data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def _ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


DATASETS = [_data(n, seed=k) for k, n in enumerate([25, 27, 30, 32])]  # sizes differ, q = 1/4 for all (one σ search)
LOCAL = LocalTraining(steps=2, batch_size=8, lr=0.3)
# σ given: calibration is tested in test_fedsvd_dp.py; seeded noise, so the run can equal `simulate`
DP = DPConfig(noise_multiplier=1.0, accountant="rdp", seeded_noise=True)
ROUNDS, PER_ROUND = 3, 2


def _flower_run(method: str, dp=None, fail=None, **app_options):
    model = _model()
    server = make_server(method, read_state(find_lora_factors(model)))
    strategy = FedSVDStrategy(server, clients_per_round=PER_ROUND, seed=5)
    app = make_client_app(
        lambda ctx: model, lambda ctx: DATASETS[int(ctx.node_config["partition-id"])], _ce, LOCAL,
        dp=dp, rounds=ROUNDS, participation=PER_ROUND / len(DATASETS), seed=5, **app_options,
    )
    evaluated = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated.append(server_round)
        return MetricRecord({"layers": len(arrays_to_state(arrays))})

    result = run_in_process(strategy, app, len(DATASETS), ROUNDS, evaluate_fn=evaluate_fn, fail=fail)
    assert evaluated == list(range(ROUNDS + 1))
    return strategy, result, model


@pytest.mark.parametrize("method, dp", [("fedsvd", DP), ("fedavg", None)], ids=["fedsvd-dp", "fedavg"])
def test_flower_run_equals_core_simulation(method: str, dp) -> None:
    strategy, result, _ = _flower_run(method, dp)
    reference = simulate(_model(), DATASETS, _ce, method=method, rounds=ROUNDS, clients_per_round=PER_ROUND,
                         local=LOCAL, dp=dp, seed=5, progress=False)
    final = arrays_to_state(result.arrays)
    for key, (a, b) in reference.state.items():
        torch.testing.assert_close(final[key][0], a, atol=1e-6, rtol=0)
        torch.testing.assert_close(final[key][1], b, atol=1e-6, rtol=0)
    if dp is not None:
        # ε restored from context.state each round: the last round's clients report the totals `simulate` reports
        expected_epsilon = max(reference.privacy[k].epsilon() for k in reference.history[-1].sampled)
        assert result.train_metrics_clientapp[ROUNDS]["epsilon-max"] == pytest.approx(expected_epsilon, rel=1e-12)
    assert all(not rejected for rejected in strategy.rejections.values())


def test_dp_nodes_draw_secret_noise_and_keep_private_metrics(caplog) -> None:
    """By default a DP node's noise is not a function of the run seed the server knows (two runs differ), and its
    train loss and clip fraction stay on the node; `seeded_noise` / `private_metrics` opt back in."""
    dp = DPConfig(noise_multiplier=1.0, accountant="rdp")
    finals = []
    for _ in range(2):
        with caplog.at_level(logging.INFO, logger="specpeft.federated"):
            strategy, result, _ = _flower_run("fedsvd", dp)
        finals.append(arrays_to_state(result.arrays))
        assert "train-loss" not in result.train_metrics_clientapp[ROUNDS]
        assert "epsilon-max" in result.train_metrics_clientapp[ROUNDS]
    assert "kept on the node under DP" in caplog.text and "clip_fraction" in caplog.text
    assert any(not torch.equal(finals[0][key][1], finals[1][key][1]) for key in finals[0])
    _, shared, _ = _flower_run("fedsvd", DP, private_metrics=True)
    assert "train-loss" in shared.train_metrics_clientapp[ROUNDS]


def test_flower_node_failure_is_excluded() -> None:
    strategy, result, _ = _flower_run("fedsvd", fail=lambda server_round, partition: server_round == 2)
    assert len(strategy.rejections[2]) == PER_ROUND
    assert all("ConnectionError: node" in r.reason for r in strategy.rejections[2])
    assert result.train_metrics_clientapp[2]["accepted"] == 0.0
    assert not strategy.rejections[1] and not strategy.rejections[3]


def test_flower_malformed_and_nan_replies_are_rejected() -> None:
    model = _model()
    state = read_state(find_lora_factors(model))
    inner = make_client_app(lambda ctx: model, lambda ctx: DATASETS[int(ctx.node_config["partition-id"])], _ce, LOCAL)
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        reply = inner(message, context)
        partition = int(context.node_config["partition-id"])
        if partition == 0:  # a reply without the metrics record
            return Message(content=RecordDict({"arrays": reply.content["arrays"]}), reply_to=message)
        if partition == 1:  # NaN in every ΔB
            tensors = reply.content["arrays"].to_torch_state_dict()
            arrays = ArrayRecord(torch_state_dict={k: torch.full_like(v, float("nan")) for k, v in tensors.items()})
            content = RecordDict({"arrays": arrays, "metrics": reply.content["metrics"]})
            return Message(content=content, reply_to=message)
        return reply

    strategy = FedSVDStrategy(make_server("fedsvd", state), clients_per_round=4, seed=0)
    result = run_in_process(strategy, app, 4, 1)
    reasons = {r.client_id: r.reason for r in strategy.rejections[1]}
    assert set(reasons) == {0, 1} and "malformed reply" in reasons[0] and "NaN or Inf" in reasons[1]
    assert result.train_metrics_clientapp[1]["accepted"] == 2.0
    final = arrays_to_state(result.arrays)
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in final.values())
    assert set(arrays_to_state(state_to_arrays(state))) == set(state)


def test_nodes_refuse_rounds_past_their_privacy_budget() -> None:
    """σ calibrated for ⌈2 steps · 5 rounds · ½⌉ = 5 steps ("expected"): a node answers a third participation with a
    BUDGET_EXHAUSTED error instead of training, so no node reports ε above the target, as in `simulate`."""
    dp = DPConfig(target_epsilon=2.0, target_delta=1e-5, accountant="rdp", calibrate_for="expected")
    datasets = DATASETS[:2]
    model = _model()
    strategy = FedSVDStrategy(make_server("fedsvd", read_state(find_lora_factors(model))), clients_per_round=1, seed=1)
    app = make_client_app(lambda ctx: model, lambda ctx: datasets[int(ctx.node_config["partition-id"])], _ce, LOCAL,
                          dp=dp, rounds=5, participation=0.5, seed=1)
    result = run_in_process(strategy, app, 2, 5)
    refusals = [r for rejected in strategy.rejections.values() for r in rejected]
    assert refusals and all("privacy budget exhausted" in r.reason for r in refusals)
    epsilons = [m["epsilon-max"] for m in result.train_metrics_clientapp.values() if "epsilon-max" in m]
    assert epsilons and max(epsilons) <= 2.0
    reference = simulate(_model(), datasets, _ce, rounds=5, clients_per_round=1, local=LOCAL, dp=dp, seed=1,
                         progress=False)
    assert [len(m.rejected) for m in reference.history] == [len(strategy.rejections[t]) for t in range(1, 6)]
    with pytest.raises(ValueError, match="rounds is required with dp"):
        make_client_app(lambda ctx: model, lambda ctx: datasets[0], _ce, LOCAL, dp=dp)
    assert BUDGET_EXHAUSTED not in range(0, 100)  # outside Flower's own error codes


def test_bf16_factors_cross_the_transport_exactly() -> None:
    """numpy has no bf16: bf16 factors and updates travel as fp32 (exact) and the model gets bf16 back."""
    model = _model().to(torch.bfloat16)
    state = read_state(find_lora_factors(model))
    back = arrays_to_state(state_to_arrays(state))
    for key, (a, b) in state.items():
        assert torch.equal(back[key][0].to(torch.bfloat16), a) and torch.equal(back[key][1].to(torch.bfloat16), b)
    strategy = FedSVDStrategy(make_server("fedsvd", state), clients_per_round=2, seed=0)
    data = [TensorDataset(d.tensors[0].to(torch.bfloat16), d.tensors[1]) for d in DATASETS[:2]]
    app = make_client_app(lambda ctx: model, lambda ctx: data[int(ctx.node_config["partition-id"])], _ce, LOCAL)
    result = run_in_process(strategy, app, 2, 1)
    assert result.train_metrics_clientapp[1]["accepted"] == 2.0 and not strategy.rejections[1]
