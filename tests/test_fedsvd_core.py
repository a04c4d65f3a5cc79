"""FedSVD federated core (peft-free): re-factorization exactness, QR route = dense route, aggregation, validation."""

import numpy as np
import pytest
import torch
from torch import nn

from specpeft.federated import (
    ClientUpdate,
    FedAvgLoRAServer,
    FedSVDServer,
    FFALoRAServer,
    dirichlet_split,
    find_lora_factors,
    make_server,
    read_state,
    refactorize_dense,
    refactorize_qr,
    write_state,
)

F64 = torch.float64


def _factors(m: int, n: int, r: int, b_rank: int | None = None, seed: int = 0, orthonormal: bool = True):
    gen = torch.Generator().manual_seed(seed)
    if orthonormal:
        A = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=F64))[0].T  # (r, n) orthonormal rows
    else:
        A = torch.randn(r, n, generator=gen, dtype=F64) / n**0.5  # Kaiming-like, round 0 of the reference code
    b_rank = r if b_rank is None else b_rank
    B = torch.randn(m, b_rank, generator=gen, dtype=F64) @ torch.randn(b_rank, r, generator=gen, dtype=F64)
    return A, B


CASES = {
    "full-rank": dict(m=40, n=30, r=6),
    "kaiming-A": dict(m=40, n=30, r=6, orthonormal=False),
    "rank-deficient-B": dict(m=40, n=30, r=6, b_rank=2),
    "zero-B": dict(m=40, n=30, r=6, b_rank=0),
    "tall-n": dict(m=12, n=100, r=8),
    "m-smaller-than-r": dict(m=3, n=20, r=5),
}


@pytest.mark.parametrize("route", [refactorize_qr, refactorize_dense], ids=["qr", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_refactor_preserves_product_and_orthonormalizes_A(case: str, route) -> None:
    A, B = _factors(**CASES[case])
    A2, B2 = route(A, B)
    r = A.shape[0]
    assert A2.shape == A.shape and B2.shape == B.shape and A2.dtype == F64
    assert torch.isfinite(A2).all() and torch.isfinite(B2).all()
    scale = max(1.0, float(torch.linalg.matrix_norm(B @ A)))
    assert float(torch.linalg.matrix_norm(B2 @ A2 - B @ A)) <= 1e-12 * scale
    torch.testing.assert_close(A2 @ A2.T, torch.eye(r, dtype=F64), atol=1e-12, rtol=0)
    # B' = U_r Σ_r: orthogonal columns whose norms are BA's singular values, in descending order (numpy reference)
    sigma = np.linalg.svd((B @ A).numpy(), compute_uv=False)[:r]
    sigma = np.pad(sigma, (0, r - len(sigma)))
    gram = (B2.T @ B2).numpy()
    np.testing.assert_allclose(gram, np.diag(sigma**2), atol=1e-10 * scale**2)


def test_qr_route_equals_dense_route() -> None:
    A, B = _factors(64, 48, 8, seed=3)
    A_qr, B_qr = refactorize_qr(A, B)
    A_dn, B_dn = refactorize_dense(A, B)
    torch.testing.assert_close(B_qr @ A_qr, B_dn @ A_dn, atol=1e-12, rtol=0)
    torch.testing.assert_close(B_qr.norm(dim=0), B_dn.norm(dim=0), atol=1e-12, rtol=0)  # same singular values
    # distinct singular values: singular vectors agree up to one sign per component
    signs = torch.sign((A_qr * A_dn).sum(dim=1))
    torch.testing.assert_close(A_qr, A_dn * signs[:, None], atol=1e-10, rtol=0)
    torch.testing.assert_close(B_qr, B_dn * signs[None, :], atol=1e-10, rtol=0)


def test_refactor_in_fp32_meets_spec_tolerance() -> None:
    A, B = (t.float() for t in _factors(256, 128, 8, seed=1))
    A2, B2 = refactorize_qr(A, B)
    assert A2.dtype == torch.float32
    reference = (B.double() @ A.double())
    error = torch.linalg.matrix_norm(B2.double() @ A2.double() - reference) / torch.linalg.matrix_norm(reference)
    assert float(error) < 1e-5
    assert float((A2.double() @ A2.double().T - torch.eye(8, dtype=F64)).abs().max()) < 1e-5


def test_refactor_rejects_rank_above_width() -> None:
    with pytest.raises(ValueError, match="exceeds A's width"):
        refactorize_qr(torch.zeros(5, 4), torch.zeros(6, 5))
    with pytest.raises(ValueError, match="B's columns"):
        refactorize_qr(torch.zeros(3, 4), torch.zeros(6, 5))


# ---------------------------------------------------------------------------------------------- aggregation


def _state(seed: int = 0) -> dict:
    return {"l1": _factors(10, 8, 3, seed=seed), "l2": _factors(6, 12, 3, seed=seed + 1)}


def _update(cid, n, state, seed, with_A=False) -> ClientUpdate:
    gen = torch.Generator().manual_seed(seed)
    dB = {k: torch.randn(b.shape, generator=gen, dtype=F64) for k, (_, b) in state.items()}
    dA = {k: torch.randn(a.shape, generator=gen, dtype=F64) for k, (a, _) in state.items()} if with_A else None
    return ClientUpdate(cid, n, dB, dA)


def test_ffa_weights_by_dataset_size_and_keeps_A() -> None:
    state = _state()
    server = FFALoRAServer(state)
    updates = [_update(k, n, state, seed=10 + k) for k, n in enumerate([10, 30, 60])]
    report = server.aggregate(updates)
    assert report.weights == pytest.approx({0: 0.1, 1: 0.3, 2: 0.6}) and not report.rejected and not report.refactored
    for key, (a, b) in state.items():
        expected_b = b + 0.1 * updates[0].delta_B[key] + 0.3 * updates[1].delta_B[key] + 0.6 * updates[2].delta_B[key]
        torch.testing.assert_close(server.state[key][1], expected_b, atol=1e-14, rtol=0)
        assert torch.equal(server.state[key][0], a)


def test_fedavg_averages_both_factors() -> None:
    state = _state()
    server = FedAvgLoRAServer(state)
    updates = [_update(k, n, state, seed=20 + k, with_A=True) for k, n in enumerate([1, 3])]
    server.aggregate(updates)
    for key, (a, b) in state.items():
        expected_a = a + 0.25 * updates[0].delta_A[key] + 0.75 * updates[1].delta_A[key]
        expected_b = b + 0.25 * updates[0].delta_B[key] + 0.75 * updates[1].delta_B[key]
        torch.testing.assert_close(server.state[key][0], expected_a)
        torch.testing.assert_close(server.state[key][1], expected_b)


def test_fedsvd_aggregates_then_refactorizes_on_schedule() -> None:
    state = _state()
    server = FedSVDServer(state, refactor_every=2, svd_warmup=2)
    flags = []
    product = {k: b @ a for k, (a, b) in state.items()}
    for t in range(6):
        upd = [_update(k, n, server.state, seed=100 * t + k) for k, n in enumerate([5, 15])]
        for key, (a, b) in server.state.items():
            product[key] = (b + 0.25 * upd[0].delta_B[key] + 0.75 * upd[1].delta_B[key]) @ a
        flags.append(server.aggregate(upd).refactored)
        for key, (a, b) in server.state.items():
            torch.testing.assert_close(b @ a, product[key], atol=1e-12, rtol=0)  # BA is what was averaged
            if flags[-1]:
                torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)
    assert flags == [False, False, False, True, False, True]  # (t+1) % 2 == 0 and t+1 > 2


def test_invalid_updates_are_rejected_with_reasons() -> None:
    state = _state()
    good = [_update(0, 20, state, seed=1), _update(1, 60, state, seed=2)]
    bad = []
    nan = _update(2, 50, state, seed=3)
    nan.delta_B["l1"][0, 0] = float("nan")
    bad.append((nan, "NaN or Inf"))
    inf = _update(3, 50, state, seed=4)
    inf.delta_B["l2"][1, 1] = float("inf")
    bad.append((inf, "NaN or Inf"))
    shape = _update(4, 50, state, seed=5)
    shape.delta_B["l1"] = torch.zeros(10, 4, dtype=F64)
    bad.append((shape, "shape (10, 4), expected (10, 3)"))
    missing = _update(5, 50, state, seed=6)
    del missing.delta_B["l2"]
    bad.append((missing, "lacks layers"))
    extra = _update(6, 50, state, seed=7)
    extra.delta_B["l3"] = torch.zeros(2, 3)
    bad.append((extra, "unknown layers"))
    bad.append((_update(7, 0, state, seed=8), "num_examples=0"))
    bad.append((_update(8, 50, state, seed=9, with_A=True), "train B only"))
    bad.append((_update(0, 50, state, seed=10), "second update"))
    server = FedSVDServer(state, refactor_every=0)
    report = server.aggregate(good + [u for u, _ in bad])
    assert report.weights == pytest.approx({0: 0.25, 1: 0.75})
    assert [r.client_id for r in report.rejected] == [u.client_id for u, _ in bad]
    for rejection, (_, reason) in zip(report.rejected, bad):
        assert reason in rejection.reason
    for key, (a, b) in state.items():
        expected = b + 0.25 * good[0].delta_B[key] + 0.75 * good[1].delta_B[key]
        torch.testing.assert_close(server.state[key][1], expected, atol=1e-14, rtol=0)


def test_fedavg_requires_delta_A_and_all_rejected_leaves_state() -> None:
    state = _state()
    server = make_server("fedavg", state)
    report = server.aggregate([_update(0, 5, state, seed=1)])
    assert report.weights == {} and "delta_A is NoneType" in report.rejected[0].reason
    for key, (a, b) in state.items():
        assert torch.equal(server.state[key][0], a) and torch.equal(server.state[key][1], b)


def test_make_server_options() -> None:
    assert make_server("fedsvd", _state(), refactor_every=3).refactor_every == 3
    with pytest.raises(TypeError, match="only 'fedsvd' takes options"):
        make_server("ffa", _state(), refactor_every=3)
    with pytest.raises(ValueError, match="'fedsvd', 'ffa', 'fedavg'"):
        make_server("flora", _state())


# ---------------------------------------------------------------------------------------------- data / state


def test_dirichlet_split_partitions_and_skews_labels() -> None:
    labels = np.repeat(np.arange(4), 250)
    parts = dirichlet_split(labels, 8, alpha=0.1, seed=0, min_size=5)
    joined = np.concatenate(parts)
    assert len(joined) == 1000 and len(np.unique(joined)) == 1000 and min(len(p) for p in parts) >= 5
    assert all(np.array_equal(p, q) for p, q in zip(parts, dirichlet_split(labels, 8, alpha=0.1, seed=0, min_size=5)))

    def mean_top_share(ps):
        return np.mean([np.bincount(labels[p], minlength=4).max() / len(p) for p in ps])

    iid = dirichlet_split(labels, 8, alpha=1000.0, seed=0)
    assert mean_top_share(parts) > 0.75 and mean_top_share(iid) < 0.4


class _HandLoRA(nn.Module):
    """A peft-free module with peft's attribute names, to show the core needs no peft."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        if conv:
            self.lora_A = nn.ModuleDict({"default": nn.Conv2d(3, 2, 3, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Conv2d(2, 5, 1, bias=False)})
        else:
            self.lora_A = nn.ModuleDict({"default": nn.Linear(7, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 4, bias=False)})


def test_state_round_trip_on_linear_and_conv_layers() -> None:
    model = nn.Sequential(_HandLoRA(conv=False), _HandLoRA(conv=True))
    factors = find_lora_factors(model)
    state = read_state(factors)
    shapes = {k: (tuple(a.shape), tuple(b.shape)) for k, (a, b) in state.items()}
    assert shapes == {"0": ((2, 7), (4, 2)), "1": ((2, 27), (5, 2))}
    new = {k: (torch.randn_like(a), torch.randn_like(b)) for k, (a, b) in state.items()}
    write_state(factors, new)
    for key, (a, b) in read_state(factors).items():
        assert torch.equal(a, new[key][0]) and torch.equal(b, new[key][1])
    assert torch.equal(model[1].lora_A["default"].weight, new["1"][0].reshape(2, 3, 3, 3))
    with pytest.raises(ValueError, match="layer '0' expects A"):
        write_state(factors, {**new, "0": (torch.zeros(3, 7), new["0"][1])})
    with pytest.raises(ValueError, match="no LoRA layer"):
        find_lora_factors(nn.Linear(2, 2))
