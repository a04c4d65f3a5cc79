"""Fine-tune a real pretrained encoder with TeRA, offline: MiniLM-L6 on Rotten Tomatoes sentiment.

    python examples/tera_minilm.py [--steps 120] [--rank R] [--out out/tera_minilm]

Adapts every attention and MLP projection of MiniLM (query, key, value, and all "dense" layers) with TeRA: the
frozen random Tucker core and factors are shared by all layers of one weight shape (three shapes, three buffers),
and only per-layer diagonal scaling vectors are trained, plus the new classifier head. Reports the trainable count,
the rank of a trained ΔW, the adapter file contents (vectors only: the factors are regenerated from the seed),
and checks that a reload onto a fresh base and a merge into plain nn.Linear weights reproduce the trained model.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
import assets  # noqa: E402
from text_classification import text_logits, train  # noqa: E402

import specpeft  # noqa: E402
from specpeft.adapters.bridge import AdapterLayer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2, help="TeRA vectors (vector methods want large rates)")
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=None,
                        help="Tucker rank R_k = min(rank, J_k) on every mode (default: the library's, 16 with a rank-1 last mode)")
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--out", default="out/tera_minilm")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on an oversubscribed machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = assets.rotten_tomatoes(n_train=args.steps * args.batch_size, n_test=args.n_test)
    base, tokenizer = assets.minilm_classifier(num_labels=2, seed=0)
    head_state = {k: v.clone() for k, v in base.classifier.state_dict().items()}
    labels = torch.tensor(data.test_labels)

    config = specpeft.TeRAConfig(target_modules=["query", "key", "value", "dense"], rank=args.rank,
                                 modules_to_save=["classifier"])
    model = specpeft.get_adapter_model(base, config)
    layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, AdapterLayer)]
    store = model.base_model.tera_shared["default"]
    print(f"TeRA on {len(layers)} layers; shared factor buffers (one per weight shape): "
          f"{ {k: tuple(v.shape) for k, v in store.items()} }")
    tera_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "tera_" in n)
    print(f"trainable TeRA vectors: {tera_params:,} (+ classifier head); frozen shared floats: "
          f"{sum(b.numel() for b in store.buffers()):,}")
    model.print_trainable_parameters()
    acc_before = (text_logits(model, data.test_text, tokenizer).argmax(-1) == labels).float().mean().item()

    vectors = [p for n, p in model.named_parameters() if p.requires_grad and "tera_" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "tera_" not in n]
    # No weight decay on the vectors: Δ is invariant to λ_1 ← cλ_1, λ_2 ← λ_2/c (spec §1.5).
    optimizer = torch.optim.AdamW([{"params": vectors, "lr": args.lr, "weight_decay": 0.0},
                                   {"params": head, "lr": args.head_lr, "weight_decay": 0.0}])
    train(model, optimizer, data, tokenizer, args.batch_size, log_every=20)

    trained = text_logits(model, data.test_text, tokenizer)
    acc_after = (trained.argmax(-1) == labels).float().mean().item()
    name, layer = layers[0]
    delta = layer.get_delta_weight("default")
    rank = torch.linalg.matrix_rank(delta.double(), rtol=max(delta.shape) * torch.finfo(delta.dtype).eps).item()
    per_layer = sum(p.numel() for p in layer.adapters["default"].parameters())
    model.save_pretrained(args.out)
    saved = load_file(os.path.join(args.out, "adapter_model.safetensors"))
    tera_keys = [k for k in saved if "tera_" in k]

    fresh, _ = assets.minilm_classifier(num_labels=2, seed=0)
    fresh.classifier.load_state_dict(head_state)
    reloaded = specpeft.load_adapter_model(fresh, args.out)
    reloaded_logits = text_logits(reloaded, data.test_text, tokenizer)
    merged = reloaded.merge_and_unload()
    merged_logits = text_logits(merged, data.test_text, tokenizer)
    merge_error = (merged_logits - trained).abs().max().item()

    print(f"\ntest accuracy (held-out movies, {len(labels)} snippets): "
          f"before {acc_before:.3f} -> after {acc_after:.3f}")
    print(f"{name.split('model.')[-1]}: ΔW {tuple(delta.shape)} has rank {rank} from {per_layer} trained numbers")
    print(f"adapter file: {len(tera_keys)} TeRA tensors, {sum(saved[k].numel() for k in tera_keys):,} floats "
          f"(shared factors saved: {any('tera_shared' in k for k in saved)}); files {sorted(os.listdir(args.out))}")
    exact = bool(torch.equal(reloaded_logits, trained))
    print(f"reloaded logits == trained logits (bit-exact, factors regenerated): {exact}")
    print(f"merged logits max |diff| = {merge_error:.2e}; merged query is "
          f"{type(merged.bert.encoder.layer[0].attention.self.query).__name__}")
    if not torch.equal(reloaded_logits, trained) or merge_error > 1e-3:
        raise SystemExit("reload or merge changed the model")


if __name__ == "__main__":
    main()
