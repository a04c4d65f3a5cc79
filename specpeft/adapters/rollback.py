"""Give a model back as an injection found it when the injection fails (an initializer's error, a budget it cannot
meet): peft replaces and adds submodules in place, so a failed `get_adapter_model` / `add_adapter` would otherwise
leave the user's model half wrapped and frozen."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["rollback_on_failure"]


@contextmanager
def rollback_on_failure(model: nn.Module) -> Iterator[None]:
    """On an exception inside the block, every submodule, parameter and buffer slot of every module of `model` gets
    back what it held on entry (replaced ones put back, added ones removed: wrappers, an adapter's entry in an
    existing layer's dicts, a saved-module copy) and every parameter its requires_grad."""
    slots = [(module, dict(module._modules), dict(module._parameters), dict(module._buffers))
             for module in model.modules()]
    grad_flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        yield
    except BaseException:
        for module, modules, parameters, buffers in slots:
            for now, before in ((module._modules, modules), (module._parameters, parameters),
                                (module._buffers, buffers)):
                for name in [name for name in now if name not in before]:
                    del now[name]
                for name, value in before.items():
                    if now.get(name) is not value:
                        now[name] = value
        for param, flag in grad_flags:
            param.requires_grad_(flag)
        raise
