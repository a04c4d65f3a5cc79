"""TeRA: spec self-checks (§1.9) against float64 references, sharing/regeneration, and the foundation matrix."""

import itertools
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from triton_guard import DEVICE, interpreter_child_test, needs_triton  # noqa: I001

import specpeft  # noqa: E402
import specpeft.kernels as K  # noqa: E402
from adapter_matrix import CHECKS, MODEL_CASES, MethodCase, adapted, perturb, run_check  # noqa: E402
from specpeft import FrozenBase, LayerGeometry, TeRAConfig  # noqa: E402
from specpeft.adapters.tera import TeRAAdapter  # noqa: E402
from specpeft.init.tucker import TuckerShape, balanced_factors, cheap_mode_ranks  # noqa: E402
from specpeft.init.tucker_cost import apply_macs, best_mode, edge_kronecker_cost  # noqa: E402
from specpeft.init.tucker_random import shared_random_factors, split_shared  # noqa: E402


TRAINABLE = {f"{side}_scale_{k}" for side in ("mode", "rank") for k in range(3)}
CASE = MethodCase(make_config=lambda targets: TeRAConfig(target_modules=targets), trainable=TRAINABLE)
TARGETS = ["0", "2", "4", "5", "6"]  # three weight shapes: 40×24 (×2), 40×40 (×2), 24×40


@pytest.mark.parametrize("model_name", list(MODEL_CASES))
@pytest.mark.parametrize("check", list(CHECKS))
def test_matrix(check: str, model_name: str) -> None:
    run_check(check, CASE, model_name)


# -- helpers ----------------------------------------------------------------------------------------------------


def several_shapes_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 40),
                         nn.Linear(40, 24), nn.Linear(24, 40)).eval()


def model_input() -> torch.Tensor:
    return torch.randn(6, 24, generator=torch.Generator().manual_seed(5))


def _adapter(d_out: int, d_in: int, dtype=torch.float64, seed: int = 11, **cfg) -> TeRAAdapter:
    """A standalone adapter with random (non-init) vectors, in `dtype`."""
    config = TeRAConfig(target_modules=["x"], **cfg)
    adapter = TeRAAdapter.create(LayerGeometry("linear", (d_out, d_in)), config, None, None, name="x").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for vector in adapter.vectors():
            vector.copy_(1 + 0.5 * torch.randn(vector.shape, generator=gen, dtype=dtype))
    return adapter


def _reference_delta(adapter: TeRAAdapter, named: dict | None = None) -> torch.Tensor:
    """α Σ_r 𝒢[r] ⊗_k reshape(λ_k ⊙ U_k[:, r_k] μ_k[r_k], (m_k, n_k)) from the raw buffer, in float64 (spec §1.2);
    `named` (parameter name → tensor) replaces the adapter's vectors, e.g. by differentiable leaves."""
    shape = adapter.shape
    core, factors = split_shared(adapter.shared_buffer.double(), shape)
    named = dict(adapter.named_parameters()) if named is None else named
    delta = torch.zeros(shape.out_features, shape.in_features, dtype=torch.float64)
    for r in itertools.product(*(range(rank) for rank in shape.ranks)):
        term = torch.ones(1, 1, dtype=torch.float64)
        for k in range(shape.order):
            column = factors[k][:, r[k]].clone()
            if f"mode_scale_{k}" in named:
                column = column * named[f"mode_scale_{k}"].double()
            if f"rank_scale_{k}" in named:
                column = column * named[f"rank_scale_{k}"].double()[r[k]]
            term = torch.kron(term, column.reshape(shape.out_modes[k], shape.in_modes[k]))
        delta += core[r] * term
    return adapter.alpha * delta


def _store(model: nn.Module, adapter_name: str = "default"):
    return model.base_model.tera_shared[adapter_name]


# -- math -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sides", ["both", "mode", "rank"])
def test_delta_equals_float64_reference(sides: str) -> None:
    adapter = _adapter(12, 20, scale_sides=sides, alpha=0.7, rank=[3, 2, 2])
    torch.testing.assert_close(adapter.delta_weight(), _reference_delta(adapter), atol=1e-12, rtol=0)


def test_closed_form_with_unit_rank_scales() -> None:
    """Spec §1.9 check 3: with μ ≡ 1, Δ = F ⊙ (L_1 ⊗ L_2 ⊗ L_3), F the frozen unfolded network."""
    adapter = _adapter(12, 20, scale_sides="mode", rank=[3, 2, 2])
    shape = adapter.shape
    lams = [v.detach() for v in adapter.vectors()]
    with torch.no_grad():
        for vector in adapter.vectors():
            vector.fill_(1.0)
        frozen = adapter.delta_weight()
        for vector, lam in zip(adapter.vectors(), lams):
            vector.copy_(lam)
    mask = torch.ones(1, 1, dtype=torch.float64)
    for lam, m_k, n_k in zip(lams, shape.out_modes, shape.in_modes):
        mask = torch.kron(mask, lam.reshape(m_k, n_k))
    torch.testing.assert_close(adapter.delta_weight(), frozen * mask, atol=1e-12, rtol=0)


def test_rank_exceeds_trainable_count() -> None:
    """Spec §1.2/§1.9 check 4: rank(Δ) = min(m, n) with far fewer trainables; R = 1 gives ∏ min(m_k, n_k)."""
    adapter = _adapter(256, 256, rank=16)
    assert adapter.shape.ranks == (16, 16, 16) and adapter.num_trainable() == 144 + 48
    assert torch.linalg.matrix_rank(adapter.delta_weight()).item() == 256 > adapter.num_trainable()
    default = _adapter(256, 256)  # `wide_last_mode`: Δ = P ⊗ M_3 with modes (8, 4, 8) × (8, 4, 8)
    assert default.shape.ranks == (16, 16, 1) and default.num_trainable() == 144 + 33
    assert torch.linalg.matrix_rank(default.delta_weight()).item() == 256 > default.num_trainable()
    wide = _adapter(192, 480, rank=4)  # modes (8, 6, 4) × (10, 8, 6): 152 + 12 trainables
    assert torch.linalg.matrix_rank(wide.delta_weight()).item() == 192 > wide.num_trainable() == 164
    single = _adapter(60, 24, rank=1, mode_sizes={"60x24": [[4, 3, 5], [2, 4, 3]]})
    assert torch.linalg.matrix_rank(single.delta_weight()).item() == 2 * 3 * 3 == 18


def test_trainable_count_matches_spec_table() -> None:
    """Spec §1.9 check 9: Σ J_k + Σ R_k per layer (816 for 4096² at R = 16, 1,248 for 11008×4096)."""
    assert _adapter(4096, 4096, dtype=torch.float32, rank=16).num_trainable() == 816
    assert _adapter(11008, 4096, dtype=torch.float32, rank=16).num_trainable() == 1248
    assert _adapter(4096, 4096, dtype=torch.float32, rank=16, scale_sides="mode").num_trainable() == 768
    default = _adapter(4096, 4096, dtype=torch.float32)  # modes (16, 8, 32)², ranks (16, 16, 1)
    assert default.num_trainable() == 256 + 64 + 1024 + 16 + 16 + 1 < 4096


def _split_reference(d_out: int, d_in: int) -> int:
    """Brute force over all divisor pairs: the least per-token cost of a full-rank P ⊗ M split of the default layout
    (rank-1 last mode m_w×n_w, balanced R = 16 modes over the rest) with fewer trainables than min(d_out, d_in)."""
    best = None
    for m_w in range(1, d_out + 1):
        for n_w in range(1, d_in + 1):
            if d_out % m_w or d_in % n_w or m_w * n_w in (1, d_out * d_in):
                continue
            m_p, n_p = d_out // m_w, d_in // n_w
            if min(m_w, n_w) * min(m_p, n_p) != min(d_out, d_in):
                continue
            rest = [a * b for a, b in zip(balanced_factors(m_p, 2), balanced_factors(n_p, 2))]
            if sum(rest) + m_w * n_w + sum(min(16, j) for j in rest) + 1 >= min(d_out, d_in):
                continue
            # x (P ⊗ M)ᵀ per token: M first (d_in·m_w, then P: d_out·n_p) or P first (m_p·d_in, then M: d_out·n_w)
            cost = min(d_in * m_w + d_out * n_p, m_p * d_in + d_out * n_w)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize(("d_out", "d_in", "modes"), [
    (4096, 4096, ((16, 8, 32), (16, 8, 32))),  # 32·4096 + 128·4096 MACs per token; (64, 64) would train 4,257 > 4,096
    (4096, 11008, ((16, 8, 32), (16, 8, 86))),
    (11008, 4096, ((16, 8, 86), (16, 8, 32))),
    (384, 1536, ((8, 8, 6), (8, 8, 24))),
    (768, 768, ((8, 4, 24), (8, 4, 24))),
])
def test_default_layout_is_the_cheapest_full_rank_kronecker_split(d_out: int, d_in: int, modes: tuple) -> None:
    """rank=None: a rank-1 last mode (Δ = P ⊗ M_N) sized to the cheapest qualifying split (brute-force reference),
    R = 16 elsewhere, fewer trainables than rank(Δ), and cheaper per token than balanced modes' best rank-1 mode."""
    shape = TeRAConfig(target_modules=["x"]).shape_for(d_out, d_in)
    assert (shape.out_modes, shape.in_modes) == modes
    assert shape.ranks == (16, 16, 1) and (shape.out_features, shape.in_features) == (d_out, d_in)
    assert sum(shape.mode_sizes) + sum(shape.ranks) < min(d_out, d_in)
    assert edge_kronecker_cost(shape)[0] == _split_reference(d_out, d_in)
    balanced = cheap_mode_ranks(balanced_factors(d_out, 3), balanced_factors(d_in, 3))
    assert edge_kronecker_cost(shape)[0] < apply_macs(balanced)[1]
    adapter = _adapter(d_out, d_in, dtype=torch.float32)
    assert adapter.edge_kronecker  # the factored path runs kernels.kronecker_linear on (P, M_N)


def test_layout_falls_back_to_balanced_modes() -> None:
    """Without a qualifying split (a prime dimension) or with explicit mode sizes, balanced modes / the given modes get
    `cheap_mode_ranks`: R = 16 except the mode whose unmerged contraction is cheapest."""
    prime = TeRAConfig(target_modules=["x"]).shape_for(97, 64)
    assert prime == cheap_mode_ranks(balanced_factors(97, 3), balanced_factors(64, 3)) and prime.out_modes == (97, 1, 1)
    for d_out, d_in in [(4096, 11008), (11008, 4096)]:  # the rank-1 mode of balanced modes: the cheapest to contract
        balanced = TeRAConfig(target_modules=["x"], rank=16).shape_for(d_out, d_in)
        modes = {f"{d_out}x{d_in}": [list(balanced.out_modes), list(balanced.in_modes)]}
        pinned = TeRAConfig(target_modules=["x"], mode_sizes=modes).shape_for(d_out, d_in)
        k = pinned.ranks.index(1)
        alternatives = [TuckerShape(pinned.out_modes, pinned.in_modes, tuple(1 if l == j else 16 for l in range(3)))
                        for j in range(3)]
        assert apply_macs(pinned, k)[1] == min(apply_macs(alt, j)[1] for j, alt in enumerate(alternatives))
    override = TeRAConfig(target_modules=["x"], mode_sizes={"12x20": [[3, 2, 2], [5, 2, 2]]}).shape_for(12, 20)
    assert sorted(override.ranks) == [1, 4, 4] and override.out_modes == (3, 2, 2)
    k = override.ranks.index(1)
    assert best_mode(override) == k
    costs = [apply_macs(TuckerShape(override.out_modes, override.in_modes,
                                    tuple(1 if l == j else min(16, size) for l, size in enumerate(override.mode_sizes))),
                        j)[1] for j in range(3)]
    assert costs[k] == min(costs)


def test_init_is_exactly_zero_with_nonzero_gradient() -> None:
    """Spec §1.5 / §1.9 check 5: Δ = 0 exactly, ∂L/∂λ_1 ≠ 0, and one step later every vector gets gradient."""
    base = nn.Linear(24, 40).requires_grad_(False)
    adapter = TeRAAdapter.create(LayerGeometry.of(base), TeRAConfig(target_modules=["x"]), base.weight, None)
    assert torch.equal(adapter.delta_weight(), torch.zeros(40, 24))
    x = torch.randn(5, 24)
    assert torch.equal(adapter(x, FrozenBase(base)), base(x))
    adapter(x, FrozenBase(base)).pow(2).sum().backward()
    grads = [v.grad for v in adapter.vectors()]
    assert grads[0].abs().sum() > 0 and all(g.abs().sum() == 0 for g in grads[1:])
    with torch.no_grad():
        adapter.vectors()[0].sub_(0.1 * grads[0])
    adapter.zero_grad()
    adapter(x, FrozenBase(base)).pow(2).sum().backward()
    assert all(v.grad.abs().sum() > 0 for v in adapter.vectors())


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="tensor_order"):
        TeRAConfig(target_modules=["x"], tensor_order=1)
    with pytest.raises(ValueError, match="TeRAConfig.rank"):
        TeRAConfig(target_modules=["x"], rank=[4, 4])
    with pytest.raises(ValueError, match="mode_sizes"):
        TeRAConfig(target_modules=["x"], mode_sizes={"12x20": [[3, 2, 2], [5, 2, 3]]})
    with pytest.raises(TypeError, match="TeRAConfig.scale_sides"):
        TeRAConfig(target_modules=["x"], scale_sides="left")


# -- sharing, saving, regeneration ------------------------------------------------------------------------------


def test_one_shared_buffer_per_shape_and_no_shared_parameters() -> None:
    model = specpeft.get_adapter_model(several_shapes_model(), TeRAConfig(target_modules=TARGETS))
    store = _store(model)
    layers = {name.rsplit(".", 1)[-1]: layer.adapters["default"] for name, layer in adapted(model)}
    assert len(list(store.buffers())) == 3  # 40×24, 40×40, 24×40
    assert layers["0"].shared_buffer.data_ptr() == layers["6"].shared_buffer.data_ptr()
    assert layers["2"].shared_buffer.data_ptr() == layers["4"].shared_buffer.data_ptr()
    assert len({layers[k].shared_buffer.data_ptr() for k in ("0", "2", "5")}) == 3
    # FSDP-relevant: every nn.Parameter belongs to exactly one module, and the shared tensors are buffers only.
    owners = [id(p) for m in model.modules() for p in m.parameters(recurse=False)]
    assert len(owners) == len(set(owners))
    assert not any(isinstance(b, nn.Parameter) for b in store.buffers())
    assert not any(p.data_ptr() == b.data_ptr() for p in model.parameters() for b in store.buffers())
    model.to(torch.float64)
    assert layers["0"].shared_buffer.dtype == torch.float64
    assert layers["0"].shared_buffer.data_ptr() == layers["6"].shared_buffer.data_ptr()


def test_file_holds_only_vectors_unless_factors_are_saved() -> None:
    x = model_input()
    for save_factors in (False, True):
        model = specpeft.get_adapter_model(
            several_shapes_model(), TeRAConfig(target_modules=TARGETS, save_shared_factors=save_factors)
        )
        perturb(model, 0.3)
        out = model(x)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            keys = set(load_file(os.path.join(tmp, "adapter_model.safetensors")))
            shared_keys = {k for k in keys if ".tera_shared." in k}
            assert all(k.rsplit(".", 1)[-1] in TRAINABLE for k in keys - shared_keys)
            assert len(keys - shared_keys) == 5 * 6
            assert len(shared_keys) == (3 if save_factors else 0)  # one entry per bucket, never per layer
            # Change the seed in the saved config: saved factors win; regenerated ones then differ.
            config_file = os.path.join(tmp, "adapter_config.json")
            with open(config_file) as fh:
                config = json.load(fh)
            config["projection_seed"] = 999
            with open(config_file, "w") as fh:
                json.dump(config, fh)
            reloaded = specpeft.load_adapter_model(several_shapes_model(), tmp)(x)
            assert torch.equal(reloaded, out) == save_factors


def test_delete_adapter_drops_its_store() -> None:
    model = specpeft.get_adapter_model(several_shapes_model(), TeRAConfig(target_modules=TARGETS))
    model.add_adapter("other", TeRAConfig(target_modules=TARGETS, projection_seed=3))
    assert set(model.base_model.tera_shared) == {"default", "other"}
    model.delete_adapter("other")
    assert set(model.base_model.tera_shared) == {"default"}


_CHILD = """
import hashlib, sys, torch
torch.set_num_threads({threads})  # the parent's: GEMM reduction order depends on the thread count
sys.path.insert(0, {tests!r})
import specpeft
from specpeft.init.tucker import TuckerShape
from specpeft.init.tucker_random import shared_random_factors
from test_tera import model_input, several_shapes_model
model = specpeft.load_adapter_model(several_shapes_model(), {adapter!r})
shape = TuckerShape.for_matrix(11008, 4096, 3, 16)
digest = hashlib.sha256(shared_random_factors(0, shape).numpy().tobytes()).hexdigest()
torch.save({{"out": model(model_input()), "digest": digest}}, {result!r})
"""


def test_reload_in_a_new_process_is_bit_exact() -> None:
    """save_shared_factors=False: a fresh interpreter regenerates the factors and reproduces the outputs exactly."""
    import hashlib

    model = specpeft.get_adapter_model(several_shapes_model(), TeRAConfig(target_modules=TARGETS))
    perturb(model, 0.3)
    out = model(model_input())
    digest = hashlib.sha256(shared_random_factors(0, TuckerShape.for_matrix(11008, 4096, 3, 16)).numpy().tobytes())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        result = os.path.join(tmp, "child.pt")
        code = _CHILD.format(tests=os.path.dirname(__file__), adapter=tmp, result=result,
                            threads=torch.get_num_threads())
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        child = torch.load(result)
    assert child["digest"] == digest.hexdigest()
    assert torch.equal(child["out"], out)


# -- Triton path (specpeft.kernels.tucker_linear, issue 9) --------------------------------------------------------


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@needs_triton
@pytest.mark.parametrize("forward_mode", ["materialized", "factored"])
def test_triton_path_runs_the_tucker_kernel(forward_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_backend="triton": the adapter calls `tucker_linear` (backend "triton") and matches the torch path's
    output and its gradients in x and every vector to 1e-5 relative (fp32); kernel_backend="torch" never calls it."""
    d_out, d_in = 12, 20  # modes (3, 2, 2) × (5, 2, 2): tiny for the interpreter, not multiples of its blocks
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).to(DEVICE).requires_grad_(False)
    calls: list[str] = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return K.tucker.tucker_linear(*args, **kwargs)

    monkeypatch.setattr(K, "tucker_linear", counting)
    x = torch.randn(2, 5, d_in, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_(True)
    upstream = torch.randn(2, 5, d_out, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        adapter = _adapter(d_out, d_in, dtype=torch.float32, rank=[3, 2, 2], alpha=0.8,
                           forward_mode=forward_mode).to(DEVICE)
        adapter.kernel_backend = backend
        before = len(calls)
        out = adapter(x, FrozenBase(base))
        assert len(calls) - before == (1 if backend == "triton" else 0)
        results[backend] = (out, *torch.autograd.grad(out, [x, *adapter.vectors()], upstream))
    assert calls == ["triton"]
    for fused, eager in zip(results["triton"], results["torch"]):
        assert eager.abs().sum() > 0
        assert _rel_err(fused, eager) <= 1e-5, _rel_err(fused, eager)


test_triton_path_in_child_process = interpreter_child_test(__file__, select="test_triton_path_runs_the_tucker_kernel")
