"""FedSVD adapter: stock peft LoRA with A frozen (orthonormal rows), B = 0 trainable; saved files are plain LoRA."""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import specpeft
from specpeft.adapters.fedsvd import add_fedsvd_adapter, freeze_lora_A, load_fedsvd_model, orthonormal_rows


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(24, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))  # (N, 6, 4, 4) -> (N, 6)
        return self.fc2(torch.relu(self.fc1(h.repeat(1, 4))))  # (N, 6) -> (N, 24) -> (N, 5)


def _base(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


CONFIG = dict(r=3, lora_alpha=6, target_modules=["conv", "fc1", "fc2"])
X = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def _lora_A(model, name="default"):
    return {n: p for n, p in model.named_parameters() if f"lora_A.{name}." in n}


def test_init_output_is_base_output_exactly() -> None:
    base = _base()
    expected = base(X)
    model = specpeft.get_adapter_model(base, specpeft.FedSVDConfig(**CONFIG))
    assert torch.equal(model(X), expected)
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_A_has_seeded_orthonormal_rows() -> None:
    model = specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(**CONFIG, seed=7))
    again = specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(**CONFIG, seed=7))
    other = specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(**CONFIG, seed=8))
    A, A_again, A_other = _lora_A(model), _lora_A(again), _lora_A(other)
    assert len(A) == 3
    for name, weight in A.items():
        rows = weight.detach().double().reshape(3, -1)  # conv (3, 3, 3, 3) -> (3, 27)
        torch.testing.assert_close(rows @ rows.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
        assert torch.equal(weight, A_again[name]) and not torch.equal(weight, A_other[name])
    assert orthonormal_rows(3, 27, torch.Generator().manual_seed(0)).shape == (3, 27)


def test_kaiming_init_option_is_seeded() -> None:
    cfg = specpeft.FedSVDConfig(**CONFIG, init_A="kaiming", seed=1)
    a1 = _lora_A(specpeft.get_adapter_model(_base(), cfg))
    a2 = _lora_A(specpeft.get_adapter_model(_base(), cfg))
    for name, weight in a1.items():
        bound = 1 / weight[0].numel() ** 0.5  # kaiming_uniform(a=√5) bound: 1/√fan_in
        assert torch.equal(weight, a2[name]) and float(weight.abs().max()) <= bound


def test_only_B_trains_and_A_stays_frozen_across_set_adapter() -> None:
    model = specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(**CONFIG))
    add_fedsvd_adapter(model, "second", specpeft.FedSVDConfig(**CONFIG, seed=3))
    for active in ["second", "default", "second"]:
        model.set_adapter(active)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(f"lora_B.{active}." in n for n in trainable), trainable
    with model.disable_adapter():
        pass
    assert not any(p.requires_grad for p in _lora_A(model, "second").values())
    assert freeze_lora_A(model, "default") == 3


def test_training_step_changes_B_only() -> None:
    model = specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(**CONFIG))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X).square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if "lora_B" in n}


def test_rank_above_width_names_the_layer() -> None:
    with pytest.raises(ValueError, match="fc2.*exceeds its input width 16"):
        specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(r=20, target_modules=["fc2"]))
    with pytest.raises(ValueError, match="init_A"):
        specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(r=2, target_modules=["fc2"], init_A="svd"))


def test_layers_whose_delta_is_not_B_times_A_are_refused_at_build() -> None:
    """A grouped conv's LoRA B reads r/groups channels (block-diagonal Δ) and an embedding LoRA has its own
    factors: neither is the B·A the federated core averages and re-factorizes, so building names the layer."""
    grouped = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match="'base_model.model.0' is a grouped convolution.*exclude_modules"):
        specpeft.get_adapter_model(grouped, specpeft.FedSVDConfig(r=2, target_modules=["0", "2"]))
    embedded = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="'base_model.model.0' is an embedding LoRA"):
        specpeft.get_adapter_model(embedded, specpeft.FedSVDConfig(r=2, target_modules=["0", "1"]))


def test_peft_add_adapter_names_the_fedsvd_route() -> None:
    model = specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(**CONFIG))
    with pytest.raises(AttributeError, match="add_fedsvd_adapter"):
        model.add_adapter("second", specpeft.FedSVDConfig(**CONFIG))
    add_fedsvd_adapter(model, "second", specpeft.FedSVDConfig(**CONFIG))
    assert set(_lora_A(model, "second")) and not any(p.requires_grad for p in _lora_A(model, "second").values())


def test_saved_adapter_is_plain_lora_that_stock_peft_loads(tmp_path) -> None:
    model = specpeft.get_adapter_model(_base(), specpeft.FedSVDConfig(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    expected = model(X)
    model.save_pretrained(tmp_path / "adapter")
    torch.save(X, tmp_path / "x.pt")
    with open(tmp_path / "adapter" / "adapter_config.json") as fh:
        assert json.load(fh)["peft_type"] == "LORA"
    # A fresh interpreter that never imports specpeft: stock peft must load the files on its own.
    torch.save(_base().state_dict(), tmp_path / "base.pt")
    # A fresh interpreter that never imports specpeft: stock peft must load the files on its own.
    script = "\n".join(
        [
            "import sys, torch",
            "from torch import nn",
            "from peft import PeftModel",
            inspect.getsource(TinyNet),
            "base = TinyNet()",
            f"base.load_state_dict(torch.load({str(tmp_path / 'base.pt')!r}))",
            f"model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()",
            "assert 'specpeft' not in sys.modules",
            f"torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'out.pt')!r})",
        ]
    )
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=0, rtol=0)

    as_lora = specpeft.load_adapter_model(_base(), tmp_path / "adapter")  # specpeft's loader reads it as plain LoRA
    assert type(specpeft.load_config(tmp_path / "adapter")).__name__ == "LoraConfig"
    torch.testing.assert_close(as_lora(X), expected, atol=0, rtol=0)

    loaded = load_fedsvd_model(_base(), tmp_path / "adapter", is_trainable=True)
    torch.testing.assert_close(loaded.eval()(X), expected, atol=0, rtol=0)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in loaded.named_parameters() if "lora_B" in n}


def test_rank_pattern_gives_a_layer_a_full_orthonormal_basis() -> None:
    """r = input width (16 for fc2): A is square orthogonal, so B·A can be any update of that layer."""
    config = specpeft.FedSVDConfig(**CONFIG, rank_pattern={"fc2": 16}, alpha_pattern={"fc2": 16})
    model = specpeft.get_adapter_model(_base(), config)
    A = {n: p.detach().double() for n, p in _lora_A(model).items()}
    square = next(a for n, a in A.items() if ".fc2." in n)
    assert square.shape == (16, 16) and next(a for n, a in A.items() if ".fc1." in n).shape == (3, 24)
    torch.testing.assert_close(square.T @ square, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        specpeft.FedSVDConfig(rank_pattern={"fc2": 0}).validate()
