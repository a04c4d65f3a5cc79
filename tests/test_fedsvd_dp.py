"""FedSVD DP-SGD clients (Opacus): per-sample clipping, noise scale and ε accounting against independent references."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import specpeft
from specpeft.federated import (
    ClientPrivacy,
    DPConfig,
    LocalTraining,
    find_lora_factors,
    read_state,
    simulate,
    train_client,
)

pytest.importorskip("opacus", reason="DP-SGD needs the optional extra specpeft[federated] (opacus)")
from opacus.accountants import PRVAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402


def _model(d_in: int = 6, hidden: int = 5, d_out: int = 3, r: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))
    model = specpeft.get_adapter_model(base, specpeft.FedSVDConfig(r=r, lora_alpha=r, target_modules=["0", "2"]))
    with torch.no_grad():  # a non-zero B so that both layers get gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def _data(n: int, d_in: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=gen) * 3, torch.randint(0, classes, (n,), generator=gen))


def _ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_clipping_matches_per_sample_reference() -> None:
    """σ = 0, q = 1: one DP step moves B by −lr/N · Σ_i g_i·min(1, C/‖g_i‖) (g_i by per-sample autograd)."""
    model, data = _model(), _data(8)
    factors = find_lora_factors(model)
    state = read_state(factors)
    b_params = [b for _, b in factors.values()]
    per_sample = []
    for x, y in zip(*data.tensors):
        grads = torch.autograd.grad(_ce(model, (x[None], y[None])), b_params)
        per_sample.append(torch.cat([g.reshape(-1) for g in grads]))
    per_sample = torch.stack(per_sample)  # (N, Σ m·r)
    norms = per_sample.norm(dim=1)
    ordered = norms.sort().values
    clip = float(ordered[3] + ordered[4]) / 2  # half the samples get clipped, none sits at the threshold
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping factor
    expected = -0.5 * (factor[:, None] * per_sample).sum(0) / len(data)

    dp = DPConfig(max_grad_norm=clip, noise_multiplier=0.0)
    privacy = ClientPrivacy(dp, len(data), batch_size=len(data), planned_steps=1)
    local = LocalTraining(steps=1, batch_size=8, lr=0.5)
    update = train_client(model, factors, state, data, _ce, local, privacy=privacy)
    got = torch.cat([update.delta_B[k].reshape(-1) for k in factors])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert update.metrics["clip_fraction"] == 0.5
    for key, (a, _) in read_state(factors).items():
        assert torch.equal(a, state[key][0])  # A is bit-identical after DP training


def test_noise_scale_is_sigma_times_clip_over_batch() -> None:
    """Zero data gradient: each ΔB entry is −lr·Σ_steps N(0, σ²C²)/N, i.e. std lr·σ·C·√steps/N."""
    model, data = _model(d_in=64, hidden=128, d_out=64, r=8), _data(8, d_in=64)
    factors = find_lora_factors(model)
    sigma, clip, steps, lr = 2.0, 0.5, 4, 1.0
    dp = DPConfig(max_grad_norm=clip, noise_multiplier=sigma, accountant="rdp")  # PRV is ill-posed at q = 1
    privacy = ClientPrivacy(dp, len(data), 8, steps)
    zero_loss = lambda m, batch: 0.0 * m(batch[0]).sum()  # noqa: E731
    update = train_client(
        model, factors, read_state(factors), data, zero_loss, LocalTraining(steps=steps, batch_size=8, lr=lr),
        privacy=privacy, seed=3,
    )
    noise = torch.cat([d.reshape(-1) for d in update.delta_B.values()]).double()  # 128·8 + 64·8 = 1536 entries
    expected_std = lr * sigma * clip * steps**0.5 / len(data)
    assert abs(float(noise.std()) / expected_std - 1) < 0.08  # std error of the std ≈ 1.8 %
    assert abs(float(noise.mean())) < 4 * expected_std / noise.numel() ** 0.5
    assert privacy.steps_taken == steps  # every step was accounted


def test_calibration_and_cumulative_epsilon_match_opacus_accountant() -> None:
    # accountant "prv" (Opacus' default); a 0.05 search tolerance keeps the two σ searches short
    dp = DPConfig(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0, epsilon_tolerance=0.05)
    clients = [_data(40, seed=1), _data(40, seed=2)]
    local = LocalTraining(steps=4, batch_size=8, lr=0.1)
    result = simulate(_model(), clients, _ce, method="fedsvd", rounds=3, local=local, dp=dp, progress=False)
    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=8 / 40, steps=12, accountant="prv", epsilon_tolerance=0.05
    )
    reference = PRVAccountant()
    reference.history = [(sigma, 8 / 40, 12)]
    for privacy in result.privacy.values():
        assert privacy.noise_multiplier == sigma and privacy.sample_rate == 8 / 40
        assert privacy.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
        assert 3.0 - 0.05 <= privacy.epsilon() <= 3.0  # the budget is spent, to the search tolerance
    epsilons = [m.epsilon for m in result.history]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_expected_calibration_stops_clients_at_their_budget() -> None:
    """calibrate_for="expected" (the reference code): a client whose next round would exceed ε is left out."""
    dp = DPConfig(target_epsilon=2.0, target_delta=1e-5, accountant="rdp", calibrate_for="expected")
    clients = [_data(32, seed=k) for k in range(2)]
    local = LocalTraining(steps=2, batch_size=8, lr=0.1)
    result = simulate(_model(), clients, _ce, rounds=5, clients_per_round=1, local=local, dp=dp, progress=False, seed=1)
    sampled = {k: sum(k in m.sampled for m in result.history) for k in range(2)}
    budget_refusals = [r for m in result.history for r in m.rejected if "privacy budget exhausted" in r.reason]
    # σ is planned for ⌈2 steps · 5 rounds · ½⌉ = 5 steps: two participations (4 steps) fit, a third would not.
    assert len(budget_refusals) == sum(max(0, count - 2) for count in sampled.values()) > 0
    for privacy in result.privacy.values():
        assert privacy.steps_taken <= 4 and privacy.epsilon() <= 2.0


def test_secret_noise_cannot_be_replayed_from_the_seed() -> None:
    """`secret_noise`: the sampling and the noise come from os.urandom, so the same seed no longer replays ΔB (a
    server knowing the seed could otherwise subtract the noise); seeded runs replay bit for bit."""
    dp = DPConfig(noise_multiplier=5.0, accountant="rdp")

    def delta(secret: bool) -> torch.Tensor:
        model, data = _model(), _data(16)
        factors = find_lora_factors(model)
        privacy = ClientPrivacy(dp, len(data), 8, 2)
        update = train_client(model, factors, read_state(factors), data, _ce, LocalTraining(steps=2, batch_size=8),
                              privacy=privacy, seed=7, secret_noise=secret)
        return torch.cat([d.reshape(-1) for d in update.delta_B.values()])

    assert torch.equal(delta(False), delta(False))
    assert not torch.equal(delta(True), delta(False)) and not torch.equal(delta(True), delta(True))


def test_empty_clients_are_refused_by_index() -> None:
    from specpeft.federated import dirichlet_split, sample_rate_for

    clients = [_data(16, seed=1), TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))]
    for dp in (None, DPConfig(noise_multiplier=1.0, accountant="rdp")):
        with pytest.raises(ValueError, match=r"clients \[1\] have no examples"):
            simulate(_model(), clients, _ce, rounds=1, dp=dp, progress=False)
    with pytest.raises(ValueError, match="needs ≥ 1 example"):
        sample_rate_for(0, 8)
    with pytest.raises(ValueError, match="1 ≤ min_size"):
        dirichlet_split([0, 1, 0, 1], num_clients=2, min_size=0)
    with pytest.raises(ValueError, match=r"clients_per_round=0 must be in \[1, 2\]"):
        simulate(_model(), clients[:1] * 2, _ce, rounds=1, clients_per_round=0, progress=False)
