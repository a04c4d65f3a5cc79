"""Fine-tune a real pretrained encoder with SVFit, offline: MiniLM-L6 on Rotten Tomatoes sentiment.

    python examples/svfit_minilm.py [--steps 150] [--out out/svfit_minilm]

Trains the top singular values of every attention query/value projection plus the new classifier head, then
saves the adapter, reloads it onto a fresh base model (no SVD re-run), merges it into plain nn.Linear weights and
checks that all three give the same predictions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import assets  # noqa: E402
from text_classification import predict, train  # noqa: E402

import specpeft  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--out", default="out/svfit_minilm")
    args = parser.parse_args()
    torch.set_num_threads(2)

    data = assets.rotten_tomatoes(n_train=args.steps * args.batch_size, n_test=args.n_test)
    base, tokenizer = assets.minilm_classifier(num_labels=2, seed=0)
    head_state = {k: v.clone() for k, v in base.classifier.state_dict().items()}
    labels = torch.tensor(data.test_labels)

    config = specpeft.SVFitConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
    start = time.perf_counter()
    model = specpeft.get_adapter_model(base, config)
    print(f"SVD init of {len(model.peft_config['default'].layer_records)} layers: {time.perf_counter() - start:.1f}s")
    ranks = {k.split("encoder.")[-1]: r["r"] for k, r in model.peft_config["default"].layer_records.items()}
    print("per-layer rank (99% energy):", ranks)
    model.print_trainable_parameters()
    acc_before = (predict(model, data.test_text, tokenizer) == labels).float().mean().item()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    train(model, optimizer, data, tokenizer, args.batch_size)

    preds = predict(model, data.test_text, tokenizer)
    acc_after = (preds == labels).float().mean().item()
    model.save_pretrained(args.out)

    fresh, _ = assets.minilm_classifier(num_labels=2, seed=0)
    fresh.classifier.load_state_dict(head_state)
    reloaded = specpeft.load_adapter_model(fresh, args.out)
    reloaded_preds = predict(reloaded, data.test_text, tokenizer)
    merged = reloaded.merge_and_unload()
    merged_preds = predict(merged, data.test_text, tokenizer)

    print(f"\ntest accuracy (held-out movies, {len(labels)} snippets): before {acc_before:.3f} -> after {acc_after:.3f}")
    print(f"adapter saved to {args.out}: {sorted(os.listdir(args.out))}")
    print(f"reloaded == trained predictions: {bool(torch.equal(reloaded_preds, preds))}")
    print(f"merged   == trained predictions: {bool(torch.equal(merged_preds, preds))}  "
          f"(merged query is {type(merged.bert.encoder.layer[0].attention.self.query).__name__})")
    if not (torch.equal(reloaded_preds, preds) and torch.equal(merged_preds, preds)):
        raise SystemExit("reload or merge changed the predictions")


if __name__ == "__main__":
    main()
