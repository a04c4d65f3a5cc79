"""Fine-tune a real pretrained encoder with SoKA, offline: MiniLM-L6 on Rotten Tomatoes sentiment.

    python examples/soka_minilm.py [--steps 150] [--rank-rule min] [--budget N] [--out out/soka_minilm]

The query and value projections of MiniLM get Kronecker factors initialized by the KPSVD of its pretrained
weight; each layer's number of components is chosen from the spectrum of its rearranged weight (energy rank r_E and Kneedle
elbow r_elb over the top 64 σ, combined by `--rank-rule`, clamped by `--max-rank`, optionally under a global
`--budget` of trainable parameters). The script prints each layer's factor shapes, r_E, r_elb, chosen rank and
captured energy Σσ²/‖W‖², checks that the wrapped model's logits
equal the base model's at init, trains the factors plus the new classifier head, and checks that the saved,
reloaded and merged models predict the same.
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

TARGETS = ["query", "value"]  # the attention projections LoRA adapts by default


def print_layers(records: dict[str, dict]) -> None:
    print(f"\n{'layer':40s} {'W':>9s} {'A ⊗ B':>17s} {'pad':>6s} {'r_E':>3s} {'r_elb':>5s} {'r':>2s} {'params':>6s} "
          f"{'energy':>7s}")
    for key, rec in records.items():
        (m1, n1), (m2, n2) = rec["a_shape"], rec["b_shape"]
        d_out, d_in = m1 * m2 - rec["padding"][0], n1 * n2 - rec["padding"][1]
        params = rec["r"] * (m1 * n1 + m2 * n2)
        print(f"{key.removeprefix('bert.encoder.'):40s} {d_out:>4d}×{d_in:<4d} {f'({m1},{n1})⊗({m2},{n2})':>17s} "
              f"{str(tuple(rec['padding'])):>6s} {rec.get('rank_energy', '-'):>3} {rec.get('rank_elbow', '-'):>5} "
              f"{rec['r']:>2d} {params:>6d} {rec['energy']:>7.3f}")
    ranks = [r["r"] for r in records.values()]
    energies = [r["energy"] for r in records.values()]
    print(f"{len(records)} layers: rank min/mean/max {min(ranks)}/{sum(ranks) / len(ranks):.2f}/{max(ranks)}, "
          f"captured energy min/mean/max {min(energies):.3f}/{sum(energies) / len(energies):.3f}/{max(energies):.3f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="for the Kronecker factors")
    parser.add_argument("--head-lr", type=float, default=2e-3, help="for the new classifier head")
    parser.add_argument("--rank-rule", default="min", choices=["min", "max", "energy", "elbow"])
    parser.add_argument("--energy", type=float, default=0.9, help="energy threshold τ")
    parser.add_argument("--max-rank", type=int, default=4,
                        help="clamp on each layer's rank (library default 1, the paper's budget; 4 shows the selection)")
    parser.add_argument("--budget", type=int, default=None, help="global trainable-parameter budget for the factors")
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--out", default="out/soka_minilm")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = assets.rotten_tomatoes(n_train=args.steps * args.batch_size, n_test=args.n_test)
    base, tokenizer = assets.minilm_classifier(num_labels=2, seed=0)
    head_state = {k: v.clone() for k, v in base.classifier.state_dict().items()}
    labels = torch.tensor(data.test_labels)
    probe = tokenizer(data.test_text[:32], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        base_logits = base.eval()(**probe).logits

    config = specpeft.SoKAConfig(target_modules=TARGETS, modules_to_save=["classifier"], rank_rule=args.rank_rule,
                                 energy_threshold=args.energy, max_rank=args.max_rank, param_budget=args.budget)
    start = time.perf_counter()
    model = specpeft.get_adapter_model(base, config)
    records = model.peft_config["default"].layer_records
    print(f"KPSVD init of {len(records)} layers: {time.perf_counter() - start:.1f}s "
          f"(rule={args.rank_rule}, τ={args.energy}, max_rank={args.max_rank}, budget={args.budget})")
    print_layers(records)
    with torch.no_grad():
        init_gap = (model.eval()(**probe).logits - base_logits).abs().max().item()
    print(f"max |logits(SoKA at init) − logits(base)| on 32 test snippets: {init_gap:.1e}")
    model.print_trainable_parameters()
    acc_before = (predict(model, data.test_text, tokenizer) == labels).float().mean().item()

    factors = [p for n, p in model.named_parameters() if p.requires_grad and "soka_adapter" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "soka_adapter" not in n]
    optimizer = torch.optim.AdamW([{"params": factors, "lr": args.lr}, {"params": head, "lr": args.head_lr}],
                                  weight_decay=0.0)  # no decay: it would shrink the principal components (spec §2.10)
    train(model, optimizer, data, tokenizer, args.batch_size)

    preds = predict(model, data.test_text, tokenizer)
    acc_after = (preds == labels).float().mean().item()
    model.save_pretrained(args.out)
    fresh, _ = assets.minilm_classifier(num_labels=2, seed=0)
    fresh.classifier.load_state_dict(head_state)
    start = time.perf_counter()
    reloaded = specpeft.load_adapter_model(fresh, args.out)
    load_s = time.perf_counter() - start
    reloaded_preds = predict(reloaded, data.test_text, tokenizer)
    merged = reloaded.merge_and_unload()
    merged_preds = predict(merged, data.test_text, tokenizer)

    print(f"\ntest accuracy (held-out movies, {len(labels)} snippets): before {acc_before:.3f} -> after {acc_after:.3f}")
    print(f"adapter saved to {args.out}: {sorted(os.listdir(args.out))}; reload (no KPSVD) took {load_s:.1f}s")
    print(f"reloaded == trained predictions: {bool(torch.equal(reloaded_preds, preds))}")
    print(f"merged   == trained predictions: {bool(torch.equal(merged_preds, preds))}  "
          f"(merged query is {type(merged.bert.encoder.layer[0].attention.self.query).__name__})")
    if init_gap != 0.0 or not (torch.equal(reloaded_preds, preds) and torch.equal(merged_preds, preds)):
        raise SystemExit("init changed the logits, or reload/merge changed the predictions")


if __name__ == "__main__":
    main()
