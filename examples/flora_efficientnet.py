"""FLoRA on a real pretrained ConvNet: EfficientNet-Lite0 (ImageNet weights) → Fashion-MNIST, offline, on CPU.

    python examples/flora_efficientnet.py            # 150 steps on 2,000 images
    # measured 2026-11-22 on the shared 2-core box (load ~6): FLoRA 0.852 vs linear probe 0.824 test accuracy,
    # 828 s CPU in all; most of it is EfficientNet's depthwise-conv backward, which the frozen base pays as well
    python examples/flora_efficientnet.py --quick    # 40 steps, a smoke run

FLoRA adapts all 49 convolutions (stem, expand 1×1, depthwise 3×3/5×5 with groups = channels, project 1×1, head
1×1; all are EfficientNet's `Conv2dStaticSamePadding`, so they run the materialized path through their own
"same"-padding forward) with per-mode ranks r (clamped per layer: a depthwise kernel has in/groups = 1), and the new
10-class head `_fc` is trained fully (`modules_to_save`). For reference the same loop trains the same fresh head
alone on pooled features of the frozen network (a linear probe). BatchNorm statistics stay frozen in the FLoRA run,
so only the named trainables change.

Printed: trainable counts, accuracy on held-out test images before and after, time per step, and a check that
`merge_and_unload()` (plain Conv2d modules with W + ΔW) gives the adapted model's logits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import specpeft  # noqa: E402
from assets import efficientnet_lite0, fashion_mnist, images_to_efficientnet  # noqa: E402
from specpeft.adapters.flora import FLoRAAdapter  # noqa: E402

CONV_TARGETS = ["_conv_stem", "_expand_conv", "_depthwise_conv", "_project_conv", "_conv_head"]
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices, n/10 per class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    per_class = n // 10
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (logits_of(model, x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """AdamW with linear warm-up/decay on the trainables; BatchNorm kept in eval mode. Returns seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup)))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()  # frozen statistics: only the named trainables adapt
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  step {step + 1:4d}/{steps}  loss {loss.item():.3f}", flush=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 steps, 500 train / 500 test images")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--r", type=int, default=8, help="FLoRA rank per mode (clamped to each mode's size)")
    parser.add_argument("--scale", type=float, default=4.0, help="FLoRA scale s (4.0 in the official ConvNeXt example)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a loaded machine)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.train_size, args.test_size = 40, 500, 500
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall, cpu = time.perf_counter(), time.process_time()

    train_images, train_labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    tr = balanced_subset(train_labels, args.train_size, args.seed)
    te = balanced_subset(test_labels, args.test_size, args.seed + 1)
    x_train = images_to_efficientnet(train_images[tr], args.image_size)  # (N, 3, S, S) in [-1, 1]
    y_train = torch.from_numpy(train_labels[tr].astype(np.int64))
    x_test = images_to_efficientnet(test_images[te], args.image_size)
    y_test = torch.from_numpy(test_labels[te].astype(np.int64))
    print(f"Fashion-MNIST: {len(x_train)} train / {len(x_test)} test images at {args.image_size}×{args.image_size}")

    # Reference: the same fresh head trained alone (a linear probe) on pooled features of the frozen network,
    # cached once in eval mode; same steps, batch and lr as the FLoRA run.
    probe_net = efficientnet_lite0(num_classes=10, seed=args.seed).eval()
    head = probe_net._fc
    with torch.no_grad():
        feats = [torch.cat([probe_net._avg_pooling(probe_net.extract_features(x[i:i + 250])).flatten(1)
                            for i in range(0, len(x), 250)]) for x in (x_train, x_test)]
    probe = nn.Sequential(probe_net._dropout, head)
    before = accuracy(probe, feats[1], y_test)
    head_count = sum(p.numel() for p in head.parameters())
    print(f"\nhead only: {head_count:,} trainable; accuracy before {before:.3f}")
    head_step = train(probe, feats[0], y_train, args.steps, args.batch, args.lr, args.seed)
    head_acc = accuracy(probe, feats[1], y_test)
    print(f"head only: accuracy after {head_acc:.3f}  ({head_step:.4f} s/step on cached features)")

    # FLoRA on every conv + the same fresh head (same seed → identical initial head).
    base = efficientnet_lite0(num_classes=10, seed=args.seed)
    config = specpeft.FLoRAConfig(target_modules=CONV_TARGETS, r=args.r, scale=args.scale, modules_to_save=["_fc"])
    model = specpeft.get_adapter_model(base, config)
    adapters = [m for m in model.modules() if isinstance(m, FLoRAAdapter)]
    flora_count = sum(p.numel() for a in adapters for p in a.parameters())
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    depthwise = [a.ranks for a in adapters if a.geometry.groups > 1]
    print(f"\nFLoRA: {len(adapters)} conv layers ({len(depthwise)} depthwise, e.g. ranks {depthwise[0]}), "
          f"{flora_count:,} FLoRA + {total - flora_count:,} head = {total:,} trainable "
          f"({100 * total / sum(p.numel() for p in base.parameters()):.2f} % of the base)")
    flora_before = accuracy(model, x_test, y_test)
    print(f"FLoRA: accuracy before {flora_before:.3f}")
    flora_step = train(model, x_train, y_train, args.steps, args.batch, args.lr, args.seed)
    flora_logits = logits_of(model, x_test)
    flora_acc = (flora_logits.argmax(1) == y_test).float().mean().item()
    print(f"FLoRA: accuracy after {flora_acc:.3f}  ({flora_step:.3f} s/step)")

    merged = model.merge_and_unload()
    merged_logits = logits_of(merged, x_test)
    diff = (merged_logits - flora_logits).abs().max().item()
    same = (merged_logits.argmax(1) == flora_logits.argmax(1)).float().mean().item()
    kinds = {type(m).__name__ for m in merged.modules() if isinstance(m, nn.Conv2d)}
    print(f"merge_and_unload: modules {sorted(kinds)}, max |logit diff| {diff:.2e}, same predictions {same:.3f}")

    print("\nsummary")
    print(f"| run | trainable | accuracy before | accuracy after | s/step |\n|---|---|---|---|---|")
    print(f"| head only (linear probe) | {head_count:,} | {before:.3f} | {head_acc:.3f} | {head_step:.4f} |")
    print(f"| FLoRA r={args.r} + head | {total:,} | {flora_before:.3f} | {flora_acc:.3f} | {flora_step:.3f} |")
    print(f"total: {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU (both threads)")


if __name__ == "__main__":
    main()
