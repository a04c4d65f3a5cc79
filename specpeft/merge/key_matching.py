"""How the keys of a training model's adapter map onto a saved base checkpoint.

Key names come from the files, with one prefix change allowed (`match_keys`); what the names alone cannot tell
(which word embeddings are tied, which linear weights are stored (in, out), the names transformers ≥ 5 saves a
renamed architecture's weights under) is read from the base's architecture, built from its config.json on the meta
device (`meta_model`).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Collection, Iterable, Optional, Sequence

import torch
from torch import nn


def meta_model(directory: str, config: dict[str, Any]) -> Optional[nn.Module]:
    """config.json's `architectures[0]` built on the meta device from its own config class (no weights, no remote
    code), or None for a directory transformers cannot build this way (no config, custom code, a config this
    transformers cannot read): then what only the architecture knows stays unknown."""
    architectures = config.get("architectures") or []
    if not architectures:
        return None
    import transformers

    model_cls = getattr(transformers, architectures[0], None)
    if model_cls is None or getattr(model_cls, "config_class", None) is None:
        return None
    try:
        model_config = model_cls.config_class.from_pretrained(directory)
        with torch.device("meta"):
            return model_cls(model_config)
    except Exception:  # any config or model this transformers cannot build: unknown (docstring)
        return None


def tied_embedding_keys(model: Optional[nn.Module]) -> Optional[tuple[str, str]]:
    """The (output, input) word-embedding weight keys `model` ties (its config's `tie_word_embeddings`), or None:
    no tie known, and a merge that never touches the embeddings needs none."""
    if model is None or not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return None
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    if output is None or embedding is None or id(output) not in names:
        return None
    return f"{names[id(output)]}.weight", f"{names[id(embedding)]}.weight"


def stores_transposed(model: Optional[nn.Module], key: str) -> Optional[bool]:
    """True when `model` stores weight `key` as (in, out) (transformers' Conv1D), False for an `nn.Linear`, None when
    the module is unknown (no model, another name, another kind)."""
    if model is None or not key.endswith(".weight"):
        return None
    from transformers.pytorch_utils import Conv1D

    try:
        module = model.get_submodule(key[: -len(".weight")])
    except AttributeError:
        return None
    return True if isinstance(module, Conv1D) else False if isinstance(module, nn.Linear) else None


def saved_names(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """{in-memory key: the key `save_pretrained` writes it under}, by transformers' own reversal of its checkpoint
    conversion mapping, one key at a time. A key that is not renamed one-to-one (no mapping, or a converter that
    fuses several tensors into one) keeps its name."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 renames nothing on save
        return {key: key for key in keys}
    state = model.state_dict()
    names = {}
    for key in keys:
        try:
            reverted = list(revert_weight_conversion(model, {key: state[key]}))
        except Exception:  # a converter that needs its sibling tensors: no one-to-one name (docstring)
            reverted = []
        names[key] = reverted[0] if len(reverted) == 1 else key
    return names


def match_keys(wanted: Sequence[str], available: Collection[str], where: str = "the base checkpoint",
               hint: str = "") -> dict[str, str]:
    """Map state-dict keys of the training model onto keys of a saved checkpoint.

    Keys match as they are, or under one prefix change applied to every key: the training model and the saved
    checkpoint can differ by a head wrapper (`model.` of a *ForCausalLM, `bert.` of a BertFor*, ...).

    Raises:
        ValueError: naming the first key that matches under no single prefix change, with close checkpoint keys; or
            naming the prefix changes when more than one maps every key (an encoder's adapter onto an encoder-decoder
            whose halves share layer names).
    """
    available = set(available)
    missing = [key for key in wanted if key not in available]
    if not missing:
        return {key: key for key in wanted}
    probe = missing[0]
    candidates: list[tuple[str, Callable[[str], str]]] = []
    for key in sorted(available):
        if key.endswith("." + probe):
            head = key[: -len(probe)]
            candidates.append((f"add '{head}'", lambda k, head=head: head + k))
        elif probe.endswith("." + key):
            cut = len(probe) - len(key)
            head = probe[:cut]
            candidates.append((f"drop '{head}'", lambda k, head=head, cut=cut: k[cut:] if k.startswith(head) else k))
    best, best_hits = {key: key for key in wanted}, len(wanted) - len(missing)
    complete: dict[str, dict[str, str]] = {}
    for change, transform in candidates:
        mapped = {key: transform(key) for key in wanted}
        hits = sum(value in available for value in mapped.values())
        if hits == len(wanted):
            complete.setdefault(change, mapped)
        elif hits > best_hits:
            best, best_hits = mapped, hits
    if len(complete) == 1:
        return next(iter(complete.values()))
    if complete:
        raise ValueError(f"The adapter's keys (e.g. '{probe}') match {where} under several prefix changes "
                         f"({'; '.join(complete)}), so where the adapter belongs is ambiguous. Save the submodule the "
                         f"adapter was trained on as its own checkpoint and pass that.{hint}")
    # name the first key that fails under the prefix change explaining the most keys
    culprit = next(key for key, value in best.items() if value not in available)
    close = difflib.get_close_matches(best[culprit], list(available), n=3, cutoff=0.5)
    close_hint = f" Close keys there: {', '.join(close)}." if close else ""
    raise ValueError(f"Adapter key '{culprit}' matches no tensor of {where} (neither as is nor under one prefix "
                     f"change).{close_hint} Pass the base model the adapter was trained on.{hint}")
