"""The two tasks of benchmarks/quality.py: MiniLM + Rotten Tomatoes (text), EfficientNet-Lite0 + Fashion-MNIST (image).

Each builds its fixed splits once (validation carved from the training pool, test held out) and hands the harness
seeded per-step training batches, so every method sees the same data in the same order.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import assets  # noqa: E402

TEXT_TARGETS = ["query", "key", "value", "dense"]
CONV_TARGETS = ["_conv_stem", "_expand_conv", "_depthwise_conv", "_project_conv", "_conv_head"]
POINTWISE_TARGETS = ["_expand_conv", "_project_conv", "_conv_head"]

Batch = tuple[Any, torch.Tensor]


@dataclass
class Task:
    name: str
    description: str
    head: str
    targets: list[str]
    fallback_targets: list[str] | None
    make_base: Callable[[int], nn.Module]
    train_batches: Callable[[int, int], list[Batch]]  # (seed, steps) -> one batch per step
    val: list[Batch]
    test: list[Batch]
    forward: Callable[[nn.Module, Any], torch.Tensor]
    freeze_norm: bool = False
    sizes: dict[str, int] = field(default_factory=dict)


def text_task(n_train: int, n_val: int, n_test: int, batch: int, max_length: int = 40) -> Task:
    data = assets.rotten_tomatoes(n_train=n_train + n_val, n_test=n_test, seed=0)
    _, tokenizer = assets.minilm_classifier(num_labels=2, seed=0)
    val_text, val_y = data.train_text[:n_val], data.train_labels[:n_val]  # carved from the training pool
    train_text, train_y = data.train_text[n_val:], data.train_labels[n_val:]

    def encode(texts: list[str], labels: list[int]) -> Batch:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(enc), torch.tensor(labels)

    def chunks(texts: list[str], labels: list[int]) -> list[Batch]:
        return [encode(texts[i:i + 128], labels[i:i + 128]) for i in range(0, len(texts), 128)]

    def train_batches(seed: int, steps: int) -> list[Batch]:
        order = _order(len(train_text), seed, steps * batch)
        return [encode([train_text[i] for i in idx], [train_y[i] for i in idx]) for idx in order.view(steps, batch)]

    def make_base(seed: int) -> nn.Module:
        return assets.minilm_classifier(num_labels=2, seed=seed)[0]

    return Task("text", "MiniLM-L6 + Rotten Tomatoes (2 classes)", "classifier", TEXT_TARGETS, None, make_base,
                train_batches, chunks(val_text, val_y), chunks(data.test_text, data.test_labels),
                lambda m, x: m(**x).logits, False,
                {"train": len(train_text), "val": n_val, "test": len(data.test_text), "batch": batch})


def image_task(n_train: int, n_val: int, n_test: int, batch: int, size: int) -> Task:
    try:
        images, labels = assets.fashion_mnist("train")
        test_images, test_labels = assets.fashion_mnist("test")
        source = "Fashion-MNIST"
    except FileNotFoundError:
        all_images, all_labels = assets.digits()
        perm = np.random.default_rng(0).permutation(len(all_labels))
        cut = len(perm) - n_test
        images, labels = all_images[perm[:cut]], all_labels[perm[:cut]]
        test_images, test_labels = all_images[perm[cut:]], all_labels[perm[cut:]]
        source = "sklearn digits"
    pool = _balanced(labels, n_train + n_val, seed=0)
    val_idx, train_idx = pool[:n_val], pool[n_val:]
    test_idx = _balanced(test_labels, n_test, seed=1)
    x_train = assets.images_to_efficientnet(images[train_idx], size)  # (N, 3, size, size) in [-1, 1]
    y_train = torch.from_numpy(labels[train_idx].astype(np.int64))

    def chunks(imgs: np.ndarray, ys: np.ndarray) -> list[Batch]:
        x = assets.images_to_efficientnet(imgs, size)
        y = torch.from_numpy(ys.astype(np.int64))
        return [(x[i:i + 250], y[i:i + 250]) for i in range(0, len(y), 250)]

    def train_batches(seed: int, steps: int) -> list[Batch]:
        order = _order(len(y_train), seed, steps * batch)
        return [(x_train[idx], y_train[idx]) for idx in order.view(steps, batch)]

    return Task("image", f"EfficientNet-Lite0 + {source} ({size}×{size}, 10 classes)", "_fc", CONV_TARGETS,
                POINTWISE_TARGETS, efficientnet_base, train_batches,
                chunks(images[val_idx], labels[val_idx]), chunks(test_images[test_idx], test_labels[test_idx]),
                lambda m, x: m(x), True,
                {"train": len(train_idx), "val": n_val, "test": len(test_idx), "batch": batch, "image_size": size})


def efficientnet_base(seed: int) -> nn.Module:
    """EfficientNet-Lite0 with a fresh 10-class head; its 1×1 "same"-padding convs become plain nn.Conv2d.

    A 1×1 stride-1 `Conv2dStaticSamePadding` pads nothing (its static_padding is an Identity), so the plain
    nn.Conv2d with the same weights computes the same function. The swap lets peft wrap those layers: peft builds
    its conv adapters with `type(base_layer)(in, r, k, ...)`, which the same-padding subclass rejects (it requires
    an `image_size`). Every method, ours included, sees the converted model.
    """
    model = assets.efficientnet_lite0(num_classes=10, seed=seed)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1) \
                    and tuple(child.stride) == (1, 1) and not isinstance(getattr(child, "static_padding", None),
                                                                          nn.ZeroPad2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, 1, groups=child.groups,
                                  bias=child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
    return model


def _order(n: int, seed: int, total: int) -> torch.Tensor:
    """`total` example indices: concatenated seeded permutations of range(n) (epochs without replacement)."""
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=gen) for _ in range(math.ceil(total / n))]
    return torch.cat(perms)[:total]


def _balanced(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices, round-robin over classes (as balanced as n allows), shuffled, drawn without replacement."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picked = [per_class[i % len(classes)][i // len(classes)] for i in range(n)]
    return rng.permutation(np.array(picked))
