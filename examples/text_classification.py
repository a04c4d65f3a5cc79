"""The training loop and evaluation the MiniLM + Rotten Tomatoes examples share (one per method).

Plain PyTorch on purpose: every example shows what its method needs around the loop (optimizer groups, a
scheduler, SNELLA's allocator) through `on_step`, and the loop itself stays the same for all of them.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from assets import TextSplit

MAX_LENGTH = 64


def text_batches(texts: list[str], labels: list[int], tokenizer, size: int,
                 generator: torch.Generator) -> Iterator[tuple[dict, torch.Tensor]]:
    """One shuffled epoch of (tokenized batch, labels); the last partial batch is dropped."""
    order = torch.randperm(len(texts), generator=generator).tolist()
    for start in range(0, len(order) - size + 1, size):
        idx = order[start : start + size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        yield enc, torch.tensor([labels[i] for i in idx])


@torch.no_grad()
def text_logits(model: nn.Module, texts: list[str], tokenizer) -> torch.Tensor:
    """Logits (N, classes) of `texts` in eval mode, 64 at a time."""
    model.eval()
    out = []
    for start in range(0, len(texts), 64):
        enc = tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        out.append(model(**enc).logits)
    return torch.cat(out)


def predict(model: nn.Module, texts: list[str], tokenizer) -> torch.Tensor:
    """Predicted class of each text."""
    return text_logits(model, texts, tokenizer).argmax(-1)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: TextSplit, tokenizer, batch_size: int,
          on_step: Optional[Callable[[int], None]] = None, log_every: int = 25, seed: int = 0) -> float:
    """One epoch of cross-entropy training over `data`'s training split; returns the wall seconds.

    `on_step(step)` runs after `optimizer.step()` and before the gradients are cleared (where a scheduler or an
    allocator that reads gradients belongs).
    """
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    step = -1
    for step, (enc, y) in enumerate(text_batches(data.train_text, data.train_labels, tokenizer, batch_size,
                                                 generator)):
        loss = nn.functional.cross_entropy(model(**enc).logits, y)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step)
        optimizer.zero_grad()
        if step % log_every == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    print(f"trained {step + 1} steps in {seconds:.0f}s")
    return seconds
