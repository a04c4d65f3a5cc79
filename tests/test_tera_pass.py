"""TeRA's networks batched per forward pass (specpeft/adapters/tera_pass.py, tera_network.kronecker_networks): one node
for L layers equals L nodes in float64, a model step with the pass equals the step with per-layer networks, one node
per bucket, and the pass holds under activation checkpointing (both kinds), no_grad, deepcopy and generate."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import specpeft
from adapter_matrix import perturb
from specpeft import TeRAConfig
from specpeft.adapters import tera_network, tera_pass
from specpeft.adapters.tera import TeRAAdapter
from specpeft.adapters.tera_network import kronecker_network, kronecker_networks
from specpeft.init.tucker import TuckerShape

F64 = torch.float64


def _layers(shape: TuckerShape, sides: str, count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *size: torch.randn(*size, generator=gen, dtype=F64)  # noqa: E731
    core = rand(*shape.ranks)
    factors = [rand(j, r) for j, r in zip(shape.mode_sizes, shape.ranks)]
    layers = []
    for _ in range(count):
        lams = [(1 + 0.5 * rand(j)).requires_grad_(True) for j in shape.mode_sizes] if sides != "rank" else []
        mus = [(1 + 0.5 * rand(r)).requires_grad_(True) for r in shape.ranks] if sides != "mode" else []
        layers.append((lams, mus))
    return core, factors, layers


def _vectors(layers) -> list[torch.Tensor]:
    return [v for lams, mus in layers for v in (*lams, *mus)]


@pytest.mark.parametrize("modes", [((4, 3), (2, 5), (3, 1)), ((2, 3, 2), (3, 2, 2), (2, 3, 1)),
                                   ((2, 3, 2), (3, 2, 2), (2, 2, 2))])
@pytest.mark.parametrize("sides", ["both", "mode", "rank"])
def test_one_node_for_many_layers_equals_a_node_per_layer(modes, sides: str) -> None:
    """(A_l, B_l) and the gradients of a random functional of all of them, batched against one node per layer."""
    shape = TuckerShape(*modes)
    core, factors, layers = _layers(shape, sides, count=3)
    batched = kronecker_networks(shape, core, factors, layers, alpha=0.7)
    single = [kronecker_network(shape, core, factors, lams, mus, alpha=0.7) for lams, mus in layers]
    gen = torch.Generator().manual_seed(5)
    weights = [(torch.randn(a.shape, generator=gen, dtype=F64), torch.randn(b.shape, generator=gen, dtype=F64))
               for a, b in single]
    totals = []
    for pairs in (batched, single):
        totals.append(sum((a * wa).sum() + (b * wb).sum() for (a, b), (wa, wb) in zip(pairs, weights)))
    for (a, b), (a_ref, b_ref) in zip(batched, single):
        torch.testing.assert_close(a, a_ref, atol=1e-13, rtol=0)
        torch.testing.assert_close(b, b_ref, atol=1e-13, rtol=0)
    vectors = _vectors(layers)
    got = torch.autograd.grad(totals[0], vectors)
    want = torch.autograd.grad(totals[1], vectors)
    for g, w in zip(got, want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_a_layer_whose_factors_go_unused_gets_no_gradient() -> None:
    """None, not zeros, as a node of its own gives: an optimizer skips the layer instead of stepping its moments."""
    shape = TuckerShape((2, 3, 2), (3, 2, 2), (2, 3, 1))
    core, factors, layers = _layers(shape, "both", count=3)
    pairs = kronecker_networks(shape, core, factors, layers)
    (pairs[0][0].sum() + pairs[2][1].sum()).backward()  # layer 0 through A only, layer 2 through B only
    assert all(v.grad is None for v in (*layers[1][0], *layers[1][1]))
    assert all(v.grad is not None for v in (*layers[0][0], *layers[0][1], *layers[2][0], *layers[2][1]))
    assert layers[0][0][-1].grad.abs().sum() == 0  # λ_N does not reach A: a zero, since the layer was used
    assert layers[2][0][-1].grad.abs().sum() > 0


def test_in_place_update_between_forward_and_backward_raises() -> None:
    """The node keeps its intermediates itself (out of activation checkpointing's sight), so it checks the versions of
    what they alias, as autograd checks saved tensors: one layer's diagonals, and the shared core of any node."""
    shape = TuckerShape((2, 3, 2), (3, 2, 2), (2, 3, 1))
    core, factors, layers = _layers(shape, "both", count=2)
    loss = kronecker_network(shape, core, factors, *layers[0])[0].sum()
    with torch.no_grad():
        layers[0][0][1].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()
    loss = kronecker_networks(shape, core, factors, layers)[1][0].sum()
    with torch.no_grad():
        layers[0][0][1].mul_(2.0)  # stacked into a copy for two layers: the backward reads the forward's values
        core.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


# -- a whole model ---------------------------------------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(**config: object) -> nn.Module:
    """A 2-layer Llama at 256 hidden (the default layout: R_N = 1 on every projection), TeRA on all seven."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=64))
    model = specpeft.get_adapter_model(model, TeRAConfig(target_modules=config.pop("targets", TARGETS), **config))
    perturb(model, 0.3)
    return model


@contextlib.contextmanager
def _per_layer_networks(model: nn.Module):
    """TeRA without the pass (`TeRAConfig.batch_networks=False`, flipped on the built layers): a network per layer."""
    layers = [m for m in model.modules() if isinstance(m, TeRAAdapter)]
    for layer in layers:
        layer.batch_networks = False
    try:
        yield
    finally:
        for layer in layers:
            layer.batch_networks = True


@contextlib.contextmanager
def _count_network_nodes():
    calls = []
    original = tera_network.KroneckerNetworkFunction.apply

    def counted(*args):
        calls.append(args[2])  # n_layers
        return original(*args)

    tera_network.KroneckerNetworkFunction.apply = counted
    try:
        yield calls
    finally:
        del tera_network.KroneckerNetworkFunction.apply  # back to autograd.Function's


def _step(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return [loss.detach(), *(p.grad for p in model.parameters() if p.requires_grad)]


@pytest.mark.parametrize("mode", ["auto", "materialized"])
def test_model_step_with_the_pass_equals_per_layer_networks(mode: str) -> None:
    """Loss and every gradient equal (fp32), with one node per bucket instead of one per layer."""
    model = _llama(forward_mode=mode)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    layers = [m for m in model.modules() if isinstance(m, TeRAAdapter)]
    buckets = {layer.bucket for layer in layers}
    with _count_network_nodes() as calls:
        batched = _step(model, ids)
    assert sorted(calls) == sorted(sum(layer.bucket == b for layer in layers) for b in buckets)
    with _count_network_nodes() as calls:
        per_layer = _step(_llama(forward_mode=mode, batch_networks=False), ids)  # the same seeds: the same model
    assert calls == [1] * len(layers)
    assert len(buckets) > 1 and len(layers) == 2 * len(TARGETS)
    for got, want in zip(batched, per_layer):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_pass_under_activation_checkpointing(reentrant: bool) -> None:
    """transformers' gradient checkpointing, non-reentrant (the recomputation in backward forms its own networks and
    must save what the forward saved) and reentrant (the forward of a checkpointed block runs without autograd; the
    recomputation builds the graph; lm_head is adapted outside any block): gradients equal the step without it."""
    targets = [*TARGETS, "lm_head"]
    want = _step(_llama(targets=targets), torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)))
    model = _llama(targets=targets)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    got = _step(model, torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_grad_enabled_inside_a_no_grad_pass_falls_back_to_per_layer_networks() -> None:
    """Factors formed without autograd are not used by a layer that runs with grad: the diagonals still train."""
    model = _llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    want = _step(model, ids)
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), model.base_model.forward_pass(), torch.enable_grad():
        loss = model.base_model.model(input_ids=ids, labels=ids).loss
    loss.backward()
    got = [loss.detach(), *(p.grad for p in model.parameters() if p.requires_grad)]
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_inner_model_deepcopy_and_generate_after_a_pass() -> None:
    """The inner model called without a pass gives the pass's logits; the modules hold no graph tensors (deepcopy
    works after a training forward); greedy generation is the same with and without the pass."""
    model = _llama()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(model.base_model.model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-6)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        with _per_layer_networks(model):
            again = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, again) and tokens.shape == (1, 10)


def _checkpointed_step_with(between: str) -> list[torch.Tensor]:
    """A non-reentrant checkpointed training forward through the PeftModel, another forward `between` it and its
    backward, then the backward."""
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    if between == "no_grad":
        with torch.no_grad():
            model(input_ids=ids)
    elif between == "inference_mode":
        with torch.inference_mode():
            model(input_ids=ids)
    elif between == "inner model":  # no pass: the layers form their own networks
        model.base_model.model(input_ids=ids).logits.sum()
    loss.backward()
    return [loss.detach(), *(p.grad for p in model.parameters() if p.requires_grad)]


@pytest.mark.parametrize("between", ["no_grad", "inference_mode", "inner model"])
def test_checkpointed_forward_survives_another_forward_before_its_backward(between: str) -> None:
    """The recomputation in backward saves what its forward saved whatever ran in between (the network node's
    intermediates are invisible to checkpointing): gradients equal the step without checkpointing."""
    want = _step(_llama(), torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)))
    for g, w in zip(_checkpointed_step_with(between), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_frozen_layers_get_factors_without_autograd() -> None:
    """A layer whose diagonals are frozen shares no node with trainable ones: its factors (and so its output) do not
    require grad, and backward never enters the frozen part below it."""
    model = _llama()
    layers = [m for m in model.modules() if isinstance(m, TeRAAdapter)]
    frozen = layers[: len(TARGETS)]  # the first decoder layer
    for layer in frozen:
        layer.requires_grad_(False)
    seen = {}
    original = TeRAAdapter._kronecker_factors

    def spy(self: TeRAAdapter):
        pair = original(self)
        seen[self] = pair[0].requires_grad
        return pair

    TeRAAdapter._kronecker_factors = spy
    try:
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        TeRAAdapter._kronecker_factors = original
    assert len(seen) == len(layers)
    assert all(not seen[layer] for layer in frozen) and all(seen[layer] for layer in layers[len(TARGETS):])
    assert all(p.grad is None for layer in frozen for p in layer.parameters())


def test_disabled_and_merged_adapters_inside_a_pass() -> None:
    """`disable_adapter()` gives the base model's logits; merged layers run no network (none is formed for them)
    and give the unmerged logits."""
    model = _llama()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.merge_adapter()
        with _count_network_nodes() as calls:
            merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    reference = _llama()
    with torch.no_grad(), reference.disable_adapter():
        torch.testing.assert_close(base, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert calls == [] and (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_causal_lm_forward_and_generate_form_one_node_per_bucket() -> None:
    """Through PeftModelForCausalLM (its forward enters the hook and calls the tuner's forward, whose nested pass adds
    nothing) and through generate (one pass for every step)."""
    model = _llama(task_type="CAUSAL_LM")
    assert type(model).__name__ == "PeftModelForCausalLM"
    buckets = {m.bucket for m in model.modules() if isinstance(m, TeRAAdapter)}
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    with _count_network_nodes() as calls:
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == len(buckets)
    with torch.no_grad(), _count_network_nodes() as calls:
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert len(calls) == len(buckets)


def test_diagonals_swapped_or_changed_after_the_pass_began_are_not_served_stale_factors() -> None:
    """Between the pass's start and a layer's call, FSDP (use_orig_params) swaps the diagonals for gathered views and
    a hook may move or modify them: the layer then forms its own network from what it holds, as without the pass."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for batch in (True, False):
        model = _llama(batch_networks=batch)
        layers = [m for m in model.modules() if isinstance(m, TeRAAdapter)]
        swapped, changed = layers[0], layers[1]

        def swap(module: nn.Module, _args: tuple) -> None:  # new Parameter objects, same values
            for name in module._vector_names:
                setattr(module, name, nn.Parameter(getattr(module, name).detach().clone()))

        def change(module: nn.Module, _args: tuple) -> None:
            with torch.no_grad():
                module.vectors()[1].mul_(1.5)

        hooks = [swapped.register_forward_pre_hook(swap), changed.register_forward_pre_hook(change)]
        out = _step(model, ids)
        for hook in hooks:
            hook.remove()
        results.append(out + [v.grad for v in swapped.vectors()] + [v.detach().clone() for v in changed.vectors()])
    for got, want in zip(*results):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_offloaded_or_misplaced_diagonals_take_no_part() -> None:
    """Diagonals on the meta device (accelerate's offload keeps them there between calls) or on another device than
    the bucket are left to the layer; the others are still batched."""
    model = _llama()
    layers = [m for m in model.modules() if isinstance(m, TeRAAdapter)]
    meta = layers[0]
    for name in meta._vector_names:
        setattr(meta, name, nn.Parameter(torch.empty_like(getattr(meta, name), device="meta")))
    table = tera_pass.batched_factors(layers)
    assert table[meta] is None and all(table[layer] is not None for layer in layers[1:])
