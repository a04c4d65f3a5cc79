"""specpeft: spectral and structured parameter-efficient fine-tuning on top of peft.

    model = specpeft.get_adapter_model(base, specpeft.SVFitConfig(target_modules="all-linear"))
    model.save_pretrained("out/adapter")
    model = specpeft.load_adapter_model(fresh_base, "out/adapter")
    merged = model.merge_and_unload()
"""

from .adapters.base import FrozenBase, MethodAdapter
from .adapters.config import SpecPeftConfig
from .adapters.fedsvd import FedSVDConfig
from .adapters.flora import FLoRAConfig
from .adapters.geometry import LayerGeometry
from .adapters.snella import SNELLAConfig
from .adapters.snella_allocator import SNELLAAllocator
from .adapters.soka import SoKAConfig
from .adapters.svfit import SVFitConfig
from .adapters.tera import TeRAConfig
from .api import get_adapter_model, load_adapter_model, load_config
from .init.svd import SVDInit
from .registry import _register_builtins, get_method, list_methods, register_method

_register_builtins()

__version__ = "0.1.0"

__all__ = [
    "FLoRAConfig",
    "FedSVDConfig",
    "FrozenBase",
    "LayerGeometry",
    "MethodAdapter",
    "SNELLAAllocator",
    "SNELLAConfig",
    "SVDInit",
    "SoKAConfig",
    "SVFitConfig",
    "TeRAConfig",
    "SpecPeftConfig",
    "get_adapter_model",
    "get_method",
    "list_methods",
    "load_adapter_model",
    "load_config",
    "register_method",
]
