"""Export without instantiating a model: merged weights, stock LoRA conversion, adapter inspection.

    merge_adapter(base_dir, adapter_dir, out_dir)                 # `specpeft merge`
    convert_to_lora(adapter_dir, out_dir, rank=16)                # `specpeft to-lora`
    inspect_adapter(adapter_dir, base=base_dir)                   # `specpeft inspect`
"""

from .export import MergeResult, merge_adapter
from .inspection import AdapterSummary, LayerStats, inspect_adapter, plot_spectra
from .key_matching import match_keys
from .lora import ConversionReport, LayerConversion, convert_to_lora
from .state_dict import LayerDelta, SavedAdapter, load_saved_adapter

__all__ = [
    "AdapterSummary",
    "ConversionReport",
    "LayerConversion",
    "LayerDelta",
    "LayerStats",
    "MergeResult",
    "SavedAdapter",
    "convert_to_lora",
    "inspect_adapter",
    "load_saved_adapter",
    "match_keys",
    "merge_adapter",
    "plot_spectra",
]
