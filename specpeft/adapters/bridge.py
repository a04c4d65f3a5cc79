"""The generic peft bridge: one BaseTunerLayer and one BaseTuner that any `MethodAdapter` plugs into.

peft supplies target matching, named adapters, set/disable/delete, merge_and_unload, modules_to_save and the
file format; this module adapts a method's math to it once. Merge, unmerge and safe-merge live here, written
once from `delta_weight`.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .._peft_compat import (
    BaseTuner,
    BaseTunerLayer,
    BufferDict,
    check_adapters_to_merge,
    gather_params_ctx,
    resolve_quantization_backend,
)
from ..kernels._dispatch import widened
from .base import FrozenBase, MethodAdapter, without_narrowing
from .config import SpecPeftConfig
from .geometry import LayerGeometry
from .rollback import rollback_on_failure


class SharedStore(BufferDict):
    """A tuner's store of one adapter's shared frozen tensors: peft's BufferDict, kept in its precision by 16-bit
    model casts as the adapters are (`base.without_narrowing`)."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SharedStore:
        return super()._apply(without_narrowing(fn), recurse)


class AdapterLayer(nn.Module, BaseTunerLayer):
    """A base layer wrapped with named adapters of one method (`adapter_cls`), stored in `<prefix>adapter`."""

    adapter_cls: ClassVar[type[MethodAdapter]]
    container: ClassVar[str]
    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    other_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SpecPeftConfig,
        key: str = "",
        shared: Optional[BufferDict] = None,
    ) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.key = key
        self.geometry = LayerGeometry.of(base_layer, key)
        self.quantization_backend = resolve_quantization_backend(base_layer)
        self.frozen_base = FrozenBase(base_layer, self.geometry, self.quantization_backend)
        self.in_features, self.out_features = self.geometry.in_features, self.geometry.out_features
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        setattr(self, self.container, nn.ModuleDict())
        self.update_layer(adapter_name, config, shared=shared)

    @property
    def adapters(self) -> nn.ModuleDict:
        return getattr(self, self.container)

    def update_layer(self, adapter_name: str, config: SpecPeftConfig, shared: Optional[BufferDict] = None) -> None:
        """Create adapter `adapter_name` from the base weight, or from the saved record when loading.

        `shared` is the tuner's shared-state store of this adapter (methods with `uses_shared_state` only).
        """
        if self.geometry.kind not in self.adapter_cls.supported_kinds:
            raise TypeError(
                f"{type(config).__name__} does not support {self.geometry.kind} layers, but target '{self.key}' is "
                f"one ({type(self.base_layer).__name__}). Supported: {', '.join(self.adapter_cls.supported_kinds)}. "
                "Exclude it with `exclude_modules`."
            )
        record = config.layer_records.get(self.key)
        base_weight = getattr(self.base_layer, "weight", None)
        on_meta = base_weight is not None and base_weight.device.type == "meta"
        weight = None
        ctx = contextlib.nullcontext() if base_weight is None else gather_params_ctx(base_weight)
        with ctx:
            if not (getattr(config, "_loading_checkpoint", False) or on_meta):
                weight = self.frozen_base.weight()
            extra = {"shared": shared} if self.adapter_cls.uses_shared_state else {}
            try:
                adapter = self.adapter_cls.create(self.geometry, config, weight, record, name=self.key, **extra)
            except ValueError as exc:  # an initializer's complaint (e.g. a NaN weight) names the layer it is about
                if f"'{self.key}'" in str(exc):
                    raise
                raise ValueError(f"{type(config).__name__}, layer '{self.key}': {exc}") from exc
        adapter.kernel_backend = config.kernel_backend
        adapter.awaiting_checkpoint = weight is None and not on_meta and base_weight is not None
        # The geometry rides along so exporters can rebuild ΔW from the files alone (merge/state_dict.py).
        config.layer_records[self.key] = {**adapter.record(), "layer": self.geometry.to_record()}
        if not on_meta and any(t.is_meta for t in adapter.parameters()):  # peft's init_empty_weights is on
            raise ValueError(
                f"{type(config).__name__}: low_cpu_mem_usage=True is not supported (layer '{self.key}'): specpeft "
                "adapters are built from the base weights (initializers, regenerated shared factors), not on the meta "
                "device. Drop the option; the adapters are small."
            )
        if base_weight is not None and not on_meta:
            adapter.to(base_weight.device)  # device only: trainables stay fp32 whatever the base dtype
            if shared is not None:
                shared.to(base_weight.device)  # in place: every layer reads the store, so all see the moved tensors
        self.adapters[adapter_name] = adapter
        self.set_adapter(self.active_adapters)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        self._require_loaded(active)
        if len(active) == 1:
            return self.adapters[active[0]](x, self.frozen_base)
        out = self.base_layer(x, *args, **kwargs)
        for name in active:
            out = out + self.adapters[name].delta_forward(x, self.frozen_base)
        return out

    # -- merge --------------------------------------------------------------------------------------------------

    def _require_loaded(self, names: list[str]) -> None:
        waiting = [name for name in names if self.adapters[name].awaiting_checkpoint]
        if waiting:
            raise ValueError(
                f"Adapter '{waiting[0]}' of layer '{self.key}' was built from a config read by `from_pretrained`, "
                "which describes a saved checkpoint (no initializer ran), but no checkpoint was loaded into it. Load "
                "it with `specpeft.load_adapter_model` / `PeftModel.from_pretrained`, or build a fresh adapter with "
                "`specpeft.get_adapter_model(model, config)` or a config from `from_json_file`."
            )

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """ΔW of one adapter in the base layer's stored layout (fp32)."""
        self._require_loaded([adapter_name])
        return self.geometry.to_storage(self.adapters[adapter_name].delta_weight())

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W ← W + ΔW for each adapter (fp32 arithmetic, fp64 for fp64 weights, cast back); `safe_merge` raises on
        NaN/Inf first."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.adapters:
                continue
            with torch.no_grad():
                weight = self.get_base_weight()
                delta = self.get_delta_weight(name).to(weight.device)
                merged = (widened(weight) + delta).to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaN or Inf in the merged weight of layer '{self.key}' for adapter '{name}'; the adapter "
                        "is broken (check the learning rate). Nothing was merged into this layer."
                    )
                self._store_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W ← W − ΔW for the merged adapters, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.adapters:
                continue
            with torch.no_grad():
                weight = self.get_base_weight()
                delta = self.get_delta_weight(name).to(weight.device)
                self._store_base_weight((widened(weight) - delta).to(weight.dtype))

    def _store_base_weight(self, weight: Tensor) -> None:
        """Write W back. A parametrized weight (weight_norm, as in wav2vec2's positional conv) is recomputed from its
        originals on every read, so it is written through the parametrization's right_inverse (a plain write
        would be lost and the layer would look merged while computing the base)."""
        base = self.get_base_layer()
        if not parametrize.is_parametrized(base, "weight"):
            self.set_base_weight(weight)
            return
        try:
            base.weight = weight
        except NotImplementedError as exc:
            raise ValueError(
                f"Layer '{self.key}': its weight is parametrized ({type(base.parametrizations.weight[0]).__name__}) "
                "without a right_inverse, so a merged weight cannot be stored. Run it unmerged, or call "
                "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') before adapting it."
            ) from exc

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return self.geometry.kind == "linear"

    def extra_repr(self) -> str:
        return f"method={self.container.removesuffix('_adapter')}, geometry={self.geometry.kind}{self.geometry.weight_shape}"


class AdapterModel(BaseTuner):
    """peft tuner for one specpeft method; a subclass per method is made by `make_tuner`."""

    prefix: str
    tuner_layer_cls: type[AdapterLayer]
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state: bool = False  # peft's flag; mirrors the adapter class (set by make_tuner)

    def _shared_state(self, adapter_name: str, config: SpecPeftConfig) -> Optional[BufferDict]:
        """The shared-state store of one adapter, `<prefix>shared.<adapter_name>`, created on first use.

        Keyed by adapter name so peft's structural state-dict code saves and loads it like any adapter container
        (file key `base_model.<prefix>shared.<buffer>`). It is persistent only if the method says so
        (`saves_shared_state(config)`); otherwise it is regenerated by `create` on load and never written.
        """
        if not self.uses_shared_state:
            return None
        name = f"{self.prefix}shared"
        if name not in self._modules:
            self.add_module(name, nn.ModuleDict())
        stores = self._modules[name]
        if adapter_name not in stores:
            persistent = self.tuner_layer_cls.adapter_cls.saves_shared_state(config)
            stores[adapter_name] = SharedStore(persistent=persistent)
        return stores[adapter_name]

    def _adapter_layers(self) -> list[AdapterLayer]:
        """This tuner's layers, memoized (every module replacement resets the memo; a DataParallel replica, whose
        copied memo would name the original layers, looks them up)."""
        layers = None if getattr(self, "_is_replica", False) else self.__dict__.get("_layers_memo")
        if layers is None:
            layers = [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]
            self.__dict__["_layers_memo"] = layers
        return layers

    def _replace_module(self, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.pop("_layers_memo", None)
        return super()._replace_module(*args, **kwargs)

    def _running_adapters(self) -> Iterator[MethodAdapter]:
        """The adapters a forward pass runs: the active ones of layers that are neither merged nor disabled."""
        for layer in self._adapter_layers():
            if not (layer.disable_adapters or layer.merged):
                yield from (layer.adapters[name] for name in layer.active_adapters if name in layer.adapters)

    def forward_pass(self) -> contextlib.AbstractContextManager[None]:
        """One forward pass of the model (`MethodAdapter.forward_pass`)."""
        return self.tuner_layer_cls.adapter_cls.forward_pass(self._running_adapters())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.forward_pass():
            return super().forward(*args, **kwargs)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Entered by PeftModel around every forward and generate (`_peft_compat.PEFT_FORWARD_HOOK`): one pass."""
        if kwargs.get("adapter_names") is not None:  # peft LoRA's mixed batches: one adapter name per row
            raise ValueError(
                f"{type(self).__name__}: `adapter_names` (a different adapter per row) is not supported; specpeft "
                "methods run the active adapters on every row. Call `set_adapter(name)` and run each adapter's rows "
                "as their own batch."
            )
        with self.forward_pass():
            yield

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's delete_adapter, plus dropping the adapter's shared-state store."""
        self.__dict__.pop("_layers_memo", None)
        super().delete_adapter(adapter_name)
        self._drop_shared_store(adapter_name)

    def _drop_shared_store(self, adapter_name: str) -> None:
        stores = self._modules.get(f"{self.prefix}shared")
        if stores is not None and adapter_name in stores:
            del stores[adapter_name]

    def _prepare_adapter_config(self, peft_config: SpecPeftConfig, model_config: dict) -> SpecPeftConfig:
        if peft_config.target_modules is None:
            raise ValueError(
                f"{type(peft_config).__name__}.target_modules is not set. Name the layers to adapt, e.g. "
                "target_modules='all-linear' or target_modules=['q_proj', 'v_proj']."
            )
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's injection, on a private copy of the config so the user's object never changes.

        The copy receives the per-layer records; it is what `save_pretrained` writes.
        """
        config = copy.deepcopy(self.peft_config[adapter_name])
        self.peft_config[adapter_name] = config
        if self.prefix in adapter_name:
            raise ValueError(
                f"Adapter name '{adapter_name}' contains the method prefix '{self.prefix}', which peft uses to find "
                "adapter keys in checkpoints. Choose another name."
            )
        loading = getattr(config, "_loading_checkpoint", False)
        show = self.tuner_layer_cls.adapter_cls.expensive_init and not loading
        self._progress = tqdm(desc=f"{type(config).__name__} init", unit="layer", disable=not show, leave=False)
        try:
            with rollback_on_failure(model):
                super().inject_adapter(model, adapter_name, *args, **kwargs)
                if not loading:  # cross-layer decisions of a fresh init (e.g. a global budget); loads use the records
                    adapters = {m.key: m.adapters[adapter_name] for m in model.modules()
                                if isinstance(m, self.tuner_layer_cls) and adapter_name in m.adapters}
                    self.tuner_layer_cls.adapter_cls.after_injection(adapters, config)
        except BaseException:
            self.__dict__.pop("_layers_memo", None)
            self._drop_shared_store(adapter_name)
            raise
        finally:
            self._progress.close()
            del self._progress  # a closed bar holds its stream: the model must stay deep-copyable and picklable
            # Loading is finished; adapters later built from this config initialize normally.
            config._loading_checkpoint = False

    def _create_and_replace(
        self,
        peft_config: SpecPeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        shared = self._shared_state(adapter_name, peft_config)
        self.__dict__.pop("_layers_memo", None)  # a new adapter in an existing layer, or a new layer
        if isinstance(target, AdapterLayer):
            target.update_layer(adapter_name, peft_config, shared=shared)
        else:
            new_module = self.tuner_layer_cls(target, adapter_name, peft_config, key=current_key, shared=shared)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added, inactive adapter is not trained
            self._replace_module(parent, target_name, new_module, target)
        self._progress.update(1)


def make_tuner(name: str, adapter_cls: type[MethodAdapter]) -> type[AdapterModel]:
    """The peft tuner class (and its layer class) for method `name`, e.g. "svfit" → prefix "svfit_"."""
    prefix = f"{name}_"
    container = f"{prefix}adapter"
    camel = "".join(part.capitalize() for part in name.split("_"))
    layer_cls = type(
        f"{camel}Layer",
        (AdapterLayer,),
        {"adapter_cls": adapter_cls, "container": container, "adapter_layer_names": (container,),
         "__module__": adapter_cls.__module__},
    )
    model_cls = type(
        f"{camel}Model",
        (AdapterModel,),
        {"prefix": prefix, "tuner_layer_cls": layer_cls, "uses_shared_state": adapter_cls.uses_shared_state,
         "__module__": adapter_cls.__module__},
    )
    module = sys.modules[adapter_cls.__module__]
    for cls in (layer_cls, model_cls):  # importable by name, as pickle (torch.save of a whole model) looks them up
        if getattr(module, cls.__name__, cls) is not cls:
            raise TypeError(f"make_tuner: {module.__name__} already defines {cls.__name__}; rename it.")
        setattr(module, cls.__name__, cls)
    return model_cls
