"""SNELLA allocator (spec §3.2, self-check 7): schedule values, exact integer budgets, plain loop and Trainer use."""

import sys
import tempfile

import pytest
import torch

import specpeft
from adapter_matrix import MLP
from specpeft import SNELLAAllocator, SNELLAConfig
from specpeft.adapters.snella_allocator import allocate_budget, cubic_budget


def _water_level(scores: list[float], volume: int, caps: list[int]) -> list[float]:
    """Continuous reference: min(cap_ℓ, λ p_ℓ) with λ found by bisection so the shares sum to `volume`."""
    total = sum(scores)
    p = [s / total for s in scores] if total > 0 else [1.0 / len(scores)] * len(scores)
    lo, hi = 0.0, float(volume) / min(x for x in p if x > 0) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(min(c, mid * x) for c, x in zip(caps, p)) < volume else (lo, mid)
    return [min(c, hi * x) for c, x in zip(caps, p)]


def test_schedule_values_match_spec_table() -> None:
    """Kept fraction at t = 0/1/10/25/50/75/99 of T = 100 with s_init = 0.01, s_target = 0.8 (spec §3.2)."""
    n = 10**8
    expected = {0: 0.99, 1: 0.967, 10: 0.776, 25: 0.533, 50: 0.299, 75: 0.212, 99: 0.200}
    for t, fraction in expected.items():
        volume, reallocate = cubic_budget(t, int(0.99 * n), int(0.2 * n), total_steps=100)
        assert round(volume / n, 3) == fraction, t
        reference = int(0.2 * n + (0.99 * n - 0.2 * n) * (1 - t / 100) ** 3)  # the reference code's float rule
        assert abs(volume - reference) <= 1
        assert reallocate == (t > 0)
    assert cubic_budget(3, 900, 100, total_steps=20, init_warmup=5) == (900, False)  # initial warmup: no change
    assert cubic_budget(18, 900, 100, total_steps=20, final_warmup=3) == (100, True)  # final phase: target
    assert cubic_budget(7, 900, 100, total_steps=20, mask_interval=2)[1] is False
    assert cubic_budget(20, 900, 100, total_steps=20) == (100, True)


def test_allocation_small_cases() -> None:
    assert allocate_budget([1.0, 1.0, 1.0], 10, [100, 100, 100]) == [4, 3, 3]  # leftover to the lowest index
    assert allocate_budget([10.0, 1.0, 1.0], 100, [20, 100, 100]) == [20, 40, 40]  # layer 0 saturates at its cap
    assert allocate_budget([0.0, 0.0], 7, [5, 5]) == [4, 3]  # no scores yet: uniform
    assert allocate_budget([3.0, 1.0], 10, [10, 10]) == [8, 2]  # quotas 7.5, 2.5: equal remainders, lower index
    assert allocate_budget([1.0, 2.0], 30, [10, 30]) == [10, 20]
    with pytest.raises(ValueError, match="volume"):
        allocate_budget([1.0], 11, [10])
    # floors first (max_layer_sparsity), then the rest by score: [2 + 18 (capped), 2 + 3, 2 + 3]
    assert allocate_budget([1.0, 0.0, 0.0], 30, [20, 20, 20], floors=[2, 2, 2]) == [20, 5, 5]
    with pytest.raises(ValueError, match="floors"):
        allocate_budget([1.0, 1.0], 3, [5, 5], floors=[2, 2])


def test_allocation_sums_exactly_and_follows_water_level() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4096, 11008), (11008, 4096), (4096, 4096), (1024, 4096), (768, 768), (64, 96)] * 5
    caps = [m * n for m, n in shapes]
    for trial in range(20):
        scores = (torch.rand(len(caps), generator=gen, dtype=torch.float64) ** 4).tolist()
        if trial % 5 == 0:
            scores[3] = 1e3  # one dominant layer: it must saturate
        if trial % 7 == 0:
            scores[1] = 0.0
        volume = int(torch.randint(0, sum(caps) + 1, (1,), generator=gen))
        budgets = allocate_budget(scores, volume, caps)
        assert sum(budgets) == volume  # exact, with totals of ~10^9 that float32 cannot count
        assert all(0 <= v <= c for v, c in zip(budgets, caps))
        for v, level in zip(budgets, _water_level(scores, volume, caps)):
            assert abs(v - level) < 1.0 + 1e-6 * level


def test_allocation_is_monotone_in_scores_for_equal_layers() -> None:
    scores = [0.1, 0.5, 0.5, 0.9, 2.0, 7.5]
    budgets = allocate_budget(scores, 12345, [5000] * 6)
    assert budgets == sorted(budgets) and sum(budgets) == 12345


def _snella_mlp(**cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    config = SNELLAConfig(target_modules=["lin0", "lin1"], low_rank_dim=4, init_sparsity=0.01, target_sparsity=0.6,
                          init_scale=0.1, **cfg)
    return specpeft.get_adapter_model(MLP(), config)


@pytest.mark.parametrize("max_layer_sparsity", [1.0, 0.7])
def test_plain_loop_reaches_target_budget(max_layer_sparsity: float) -> None:
    model = _snella_mlp(max_layer_sparsity=max_layer_sparsity)
    allocator = SNELLAAllocator(model, total_steps=5)
    assert allocator.floors == ([0, 0] if max_layer_sparsity == 1.0 else [288, 144])  # round(0.3·N)
    assert allocator.v_init == 950 + 475 and allocator.v_target == 384 + 192  # round((1 − s)·N) per layer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, 24), torch.randn(16, 12)
    history = []
    for t in range(5):
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        history.append(allocator.step(t + 1))
        optimizer.zero_grad()
    volumes = [sum(h.values()) for h in history]
    expected = [cubic_budget(t, allocator.v_init, allocator.v_target, 5)[0] for t in range(1, 6)]
    assert volumes == expected and volumes[-1] == allocator.v_target
    assert sum(int(layer.kept) for layer in allocator.layers.values()) == allocator.v_target
    assert all(score > 0 for score in allocator.last_scores.values())
    assert history[-1] == {name: int(layer.kept) for name, layer in allocator.layers.items()}
    assert all(v >= f for h in history for v, f in zip(h.values(), allocator.floors))


def test_importance_ema_and_non_finite_guard() -> None:
    model = _snella_mlp()
    allocator = SNELLAAllocator(model, total_steps=5, beta1=0.5, beta2=0.5)
    model(torch.randn(4, 24)).pow(2).sum().backward()
    layer = allocator.layers["lin0"]
    assert allocator.update_importance()
    importance = (layer.in_qs * layer.in_qs.grad).abs()
    torch.testing.assert_close(allocator.exp_sensitivity["lin0.in_qs"], 0.5 * importance)  # Ī = (1 − β1) I
    torch.testing.assert_close(allocator.exp_uncertainty["lin0.in_qs"], 0.25 * importance)  # Ū = (1 − β2)|I − Ī|
    before = {k: v.clone() for k, v in allocator.exp_sensitivity.items()}
    layer.out_qs.grad[0, 0, 0] = float("inf")  # an AMP overflow step
    assert not allocator.update_importance()
    assert all(torch.equal(before[k], v) for k, v in allocator.exp_sensitivity.items())


def test_allocator_needs_snella_layers() -> None:
    with pytest.raises(ValueError, match="no SNELLA adapter"):
        SNELLAAllocator(MLP())


def test_overrides_get_the_config_checks_by_name() -> None:
    model = _snella_mlp()
    for override, field in [(dict(target_sparsity=-0.5), "target_sparsity"), (dict(beta1=1.5), "beta1"),
                            (dict(init_sparsity=0.95, max_layer_sparsity=0.92), "max_layer_sparsity")]:
        with pytest.raises(ValueError, match=f"SNELLAAllocator .*{field}="):
            SNELLAAllocator(model, total_steps=5, **override)


def test_a_frozen_layer_keeps_its_entries() -> None:
    """A frozen layer's ΔW is kept as learned; the trainable layers alone meet the target."""
    model = _snella_mlp()
    frozen = model.base_model.model.lin0.snella_adapter["default"]
    frozen.requires_grad_(False)
    kept = int(frozen.kept)
    allocator = SNELLAAllocator(model, total_steps=5)
    assert list(allocator.layers) == ["lin1"] and allocator.v_target == 192
    for t in range(5):
        model(torch.randn(8, 24)).pow(2).mean().backward()
        allocator.step(t + 1)
        model.zero_grad()
    assert int(frozen.kept) == kept and int(allocator.layers["lin1"].kept) == 192
    frozen_all = _snella_mlp()
    frozen_all.requires_grad_(False)
    with pytest.raises(ValueError, match="every SNELLA layer .* is frozen"):
        SNELLAAllocator(frozen_all, total_steps=5)


def test_epoch_schedule_counts_the_epochs_the_trainer_runs() -> None:
    """With max_steps set the Trainer runs state.num_train_epochs epochs, not args.num_train_epochs (default 3)."""
    from types import SimpleNamespace

    allocator = SNELLAAllocator(_snella_mlp(), schedule_unit="epoch", init_warmup=0, final_warmup=0)
    allocator.on_train_begin(SimpleNamespace(num_train_epochs=3), SimpleNamespace(num_train_epochs=5.5, max_steps=11),
                             None)
    assert allocator.total_steps == 6
    endless = SNELLAAllocator(_snella_mlp(), schedule_unit="epoch", init_warmup=0, final_warmup=0)
    with pytest.raises(ValueError, match="counts no epochs.*schedule_unit='step'"):  # an iterable dataset
        endless.on_train_begin(SimpleNamespace(num_train_epochs=3),
                               SimpleNamespace(num_train_epochs=sys.maxsize, max_steps=11), None)


def test_trainer_callback_runs_the_schedule() -> None:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=96, max_position_embeddings=64))
    config = SNELLAConfig(target_modules=["query", "value"], low_rank_dim=4, init_sparsity=0.0, target_sparsity=0.5,
                          init_scale=0.1, modules_to_save=["classifier"])
    model = specpeft.get_adapter_model(bert, config)
    allocator = SNELLAAllocator(model)  # total_steps comes from the Trainer's max_steps
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 96, (8,), generator=gen), "labels": torch.tensor(i % 2)} for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                                 report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[allocator]).train()
    assert allocator.total_steps == 4
    assert len(allocator.exp_sensitivity) == 2 * len(allocator.layers)  # scores were updated with live gradients
    assert sum(int(layer.kept) for layer in allocator.layers.values()) == allocator.v_target
    assert sum(allocator.last_allocation.values()) == allocator.v_target
    sparsities = allocator.sparsities()
    assert len(set(round(s, 6) for s in sparsities.values())) > 1  # layers compete: not a uniform split
