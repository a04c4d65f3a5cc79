"""FedSVD in-process simulation: faulty clients are never averaged in; one-client FedSVD = central B training + SVD."""

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import specpeft
from specpeft.federated import (
    LocalTraining,
    find_lora_factors,
    read_state,
    refactorize_dense,
    simulate,
    train_client,
)
from specpeft.federated.simulate import client_seed


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    return specpeft.get_adapter_model(base, specpeft.FedSVDConfig(r=4, lora_alpha=4, target_modules=["0", "2"]))


def _data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def _ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


class Broken(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        raise OSError("disk on client 4 failed")


LOCAL = LocalTraining(steps=3, batch_size=8, lr=0.3)


def test_faulty_clients_are_excluded_with_logged_reasons(caplog) -> None:
    datasets = [_data(20 + 10 * k, seed=k) for k in range(4)] + [Broken(), _data(40, seed=5)]

    def network(round_: int, client: int, update):
        if client == 1:
            update.delta_B[next(iter(update.delta_B))][0, 0] = float("nan")
        if client == 2:
            update.delta_B = {k: v[:, :-1] for k, v in update.delta_B.items()}
        return None if client == 3 else update

    model = _model()
    factors = find_lora_factors(model)
    initial = read_state(factors)
    with caplog.at_level(logging.WARNING, logger="specpeft.federated"):
        result = simulate(model, datasets, _ce, rounds=1, local=LOCAL, update_hook=network, progress=False, seed=4)
    reasons = {r.client_id: r.reason for r in result.history[0].rejected}
    assert set(reasons) == {1, 2, 3, 4}
    assert "NaN or Inf" in reasons[1] and "shape" in reasons[2]
    assert "no update received" in reasons[3] and "OSError: disk on client 4 failed" in reasons[4]
    assert all(f"client {k}" in caplog.text for k in reasons)
    assert result.history[0].weights == pytest.approx({0: 20 / 60, 5: 40 / 60})

    # reference: the good clients alone, trained from the same broadcast with the same seeds, averaged by size
    reference = {key: b.double().clone() for key, (_, b) in initial.items()}
    for k, weight in ((0, 1 / 3), (5, 2 / 3)):
        fresh = _model()
        factors = find_lora_factors(fresh)
        update = train_client(fresh, factors, initial, datasets[k], _ce, LOCAL, seed=client_seed(4, 1, k))
        for key in reference:
            reference[key] += weight * update.delta_B[key].double()
    for key, (a, b) in result.state.items():  # FedSVD re-factorized: compare the product B·A
        expected = reference[key] @ initial[key][0].double()
        torch.testing.assert_close(b.double() @ a.double(), expected, atol=1e-6, rtol=0)


def test_one_client_fedsvd_equals_central_B_training_then_svd() -> None:
    """Spec self-check 5: one client, no DP, full participation."""
    data = _data(48, seed=7)
    model = _model()
    factors = find_lora_factors(model)
    initial = read_state(factors)
    b_params = [b for _, b in factors.values()]
    optimizer = torch.optim.SGD(b_params, lr=LOCAL.lr)
    generator = torch.Generator().manual_seed(client_seed(0, 1, 0))
    loader = torch.utils.data.DataLoader(data, batch_size=LOCAL.batch_size, shuffle=True, generator=generator)
    for _, batch in zip(range(LOCAL.steps), loader):
        optimizer.zero_grad()
        _ce(model, batch).backward()
        optimizer.step()
    expected = {key: refactorize_dense(a.double(), b.double()) for key, (a, b) in read_state(factors).items()}

    result = simulate(_model(), [data], _ce, rounds=1, local=LOCAL, progress=False, initial_state=initial)
    for key, (a, b) in result.state.items():
        a_ref, b_ref = expected[key]
        torch.testing.assert_close(b.double() @ a.double(), b_ref @ a_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(b.double().norm(dim=0), b_ref.norm(dim=0), atol=1e-6, rtol=0)  # singular values


def test_protocols_treat_A_as_specified() -> None:
    datasets = [_data(32, seed=k) for k in range(3)]
    initial = read_state(find_lora_factors(_model()))
    runs = {
        method: simulate(_model(), datasets, _ce, method=method, rounds=3, clients_per_round=2, local=LOCAL,
                         initial_state=initial, progress=False)
        for method in ("fedsvd", "ffa", "fedavg")
    }
    for method, result in runs.items():
        assert [m.sampled for m in result.history] == [m.sampled for m in runs["fedsvd"].history]  # same clients
        for key, (a, _) in result.state.items():
            if method == "ffa":
                assert torch.equal(a, initial[key][0])
            else:
                assert not torch.allclose(a, initial[key][0], atol=1e-3)
            gram = a.double() @ a.double().T
            assert torch.allclose(gram, torch.eye(4, dtype=torch.float64), atol=1e-5) == (method != "fedavg")
    assert all(m.refactored for m in runs["fedsvd"].history) and not any(m.refactored for m in runs["ffa"].history)


def test_simulated_dropouts_and_total_failure() -> None:
    datasets = [_data(16, seed=k) for k in range(4)]
    result = simulate(_model(), datasets, _ce, rounds=4, local=LOCAL, dropout_rate=0.5, progress=False, seed=2)
    dropped = [r for m in result.history for r in m.rejected]
    assert dropped and all(r.reason == "dropped out (simulated)" for r in dropped)
    for m in result.history:
        assert set(m.weights) | {r.client_id for r in m.rejected} == set(m.sampled)
    with pytest.raises(RuntimeError, match="every client of round 1 failed"):
        simulate(_model(), [Broken(), Broken()], _ce, rounds=1, local=LOCAL, progress=False)


def test_orthonormal_start_makes_fedsvd_match_ffa_under_sgd() -> None:
    """Re-factorization keeps span(A) when rank(BA) = r, and plain SGD on B is equivariant to a rotation of A's
    basis: from an orthonormal A, FedSVD and FFA-LoRA give the same B·A; from the reference's Kaiming A they do not
    (FedSVD orthonormalizes A after round 1)."""
    datasets = [_data(32, seed=k) for k in range(4)]
    gaps = {}
    for init in ("orthonormal", "kaiming"):
        products = {}
        for method in ("ffa", "fedsvd"):
            torch.manual_seed(0)
            base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
            config = specpeft.FedSVDConfig(r=4, lora_alpha=4, target_modules=["0", "2"], init_A=init)
            model = specpeft.get_adapter_model(base, config)
            result = simulate(model, datasets, _ce, method=method, rounds=3, clients_per_round=2, local=LOCAL,
                              progress=False)
            products[method] = {k: b.double() @ a.double() for k, (a, b) in result.state.items()}
        gaps[init] = max(float((p - products["fedsvd"][k]).norm() / p.norm()) for k, p in products["ffa"].items())
    assert gaps["orthonormal"] < 1e-5 and gaps["kaiming"] > 0.05, gaps


class NormNet(nn.Module):
    """Linear -> BatchNorm -> dropout -> Linear: frozen norm statistics and dropout randomness inside a client round."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.drop, self.fc2 = nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(x)))))


def _norm_model() -> nn.Module:
    torch.manual_seed(0)
    config = specpeft.FedSVDConfig(r=2, lora_alpha=2, lora_dropout=0.3, target_modules=["fc1", "fc2"])
    return specpeft.get_adapter_model(NormNet(), config)


def test_client_rounds_keep_norm_statistics_and_are_reproducible() -> None:
    """BatchNorm running statistics are client data that is never aggregated: a round leaves them as they were. The
    seed fixes dropout too, whatever ran before on the global RNG, and the model's modes are restored."""
    clients = [_data(24, seed=k) for k in range(2)]
    runs = []
    for noise in (1, 7):
        model = _norm_model().eval()
        stats = [t.clone() for t in (model.base_model.model.norm.running_mean, model.base_model.model.norm.running_var)]
        torch.manual_seed(noise)  # unrelated use of the global RNG before the run
        torch.rand(noise)
        result = simulate(model, clients, _ce, rounds=2, local=LOCAL, seed=4, progress=False)
        assert torch.equal(model.base_model.model.norm.running_mean, stats[0])
        assert torch.equal(model.base_model.model.norm.running_var, stats[1])
        assert not any(module.training for module in model.modules())
        runs.append(result.state)
    for key, (a, b) in runs[0].items():
        assert torch.equal(runs[1][key][0], a) and torch.equal(runs[1][key][1], b)
    assert any(b.abs().sum() > 0 for _, b in runs[0].values())  # B trained (dropout active in the rounds)


def test_an_inactive_adapter_is_refused_by_name() -> None:
    model = _model()
    model.add_adapter("second", model.peft_config["default"])
    with pytest.raises(ValueError, match="adapter 'second' is not active.*set_adapter\\('second'\\)"):
        simulate(model, [_data(16, seed=0)], _ce, rounds=1, adapter_name="second", progress=False)


def test_active_adapters_of_a_transformers_model_are_read() -> None:
    """transformers' own LoRA integration (model.add_adapter) exposes active_adapters as a method, peft's as a list."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from specpeft.federated.client import require_active

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    require_active(model, "default", "simulate")
    with pytest.raises(ValueError, match="adapter 'other' is not active"):
        require_active(model, "other", "simulate")
