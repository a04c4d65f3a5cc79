"""Federated LoRA on a real encoder, offline: FedSVD vs FFA-LoRA vs FedAvg-LoRA, with and without DP-SGD.

    python examples/fedsvd_federated.py [--rounds 8] [--epsilon 6] [--plot out/fedsvd_accuracy.png]

MiniLM-L6 (all-MiniLM-L6-v2) on Rotten Tomatoes sentiment (test snippets from held-out movies), split over K
clients by a Dirichlet(α) label split (non-IID, as the reference code). Each round m clients are sampled (the same
clients for every method), train LoRA's B (FedAvg-LoRA: A and B) for a few local SGD steps from the broadcast
factors, and the server averages by dataset size; FedSVD then re-factorizes B·A so that A has orthonormal rows
(the top right singular vectors of B·A). The DP runs use Opacus DP-SGD on every client (per-sample clipping C,
Poisson sampling, σ calibrated so that the whole run spends at most (ε, δ) per client, PRV accountant); the ε
column is the largest cumulative ε over all clients.

Setup choices (all methods identical):
- LoRA r=8 on query/value of the top `--train-layers` encoder layers; the frozen layers below run once and their
  outputs are cached (checked against the full model at start), so the run fits a few CPU minutes.
- The sentence embedding is the mean of the last hidden states, the pooling all-MiniLM-L6-v2 was trained with
  (the BERT [CLS] pooler path learned far more slowly in our trials). The new 2-class head keeps its random init
  frozen, as in the reference code, and gets a LoRA of rank 384 = its input width: A is then a full basis and B·A
  an unrestricted head update, so the head trains in every protocol while only LoRA factors move.
- `--init-A kaiming` (default) starts A as peft/the reference code do; FedSVD orthonormalizes it after round 1.
  With `--init-A orthonormal`, FedSVD and FFA-LoRA coincide under plain SGD: re-factorization keeps span(A) and
  SGD on B is equivariant to a rotation of A's basis (tests/test_fedsvd_simulate.py checks this).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
import assets  # noqa: E402

import specpeft  # noqa: E402
from specpeft.federated import (  # noqa: E402
    DPConfig,
    LocalTraining,
    classification_eval,
    dirichlet_split,
    find_lora_factors,
    read_state,
    simulate,
)

METHODS = {"fedsvd": "FedSVD", "ffa": "FFA-LoRA", "fedavg": "FedAvg-LoRA"}


class TopLayers(nn.Module):
    """The last encoder layers of a BertForSequenceClassification, mean pooling and its classifier head."""

    def __init__(self, classifier: nn.Module, first_layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(classifier.bert.encoder.layer[first_layer:])
        self.classifier = classifier.classifier

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # (N, L) keep-mask -> (N, 1, 1, L) additive mask, what BertModel passes its layers (eager and SDPA alike)
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.classifier(mean_pool(hidden, mask))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(hidden.dtype)  # (N, L) -> (N, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1)  # (N, L, d) -> (N, d)


@torch.no_grad()
def lower_features(model: nn.Module, tokenizer, texts: list[str], first_layer: int, max_length: int):
    """Hidden states entering layer `first_layer` (N, L, 384) and the attention mask (N, L)."""
    model.eval()
    hidden, masks = [], []
    for start in range(0, len(texts), 128):
        enc = tokenizer(texts[start : start + 128], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden.append(model.bert(**enc, output_hidden_states=True).hidden_states[first_layer])
        masks.append(enc["attention_mask"])
    return torch.cat(hidden), torch.cat(masks)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    hidden, mask, labels = batch
    return nn.functional.cross_entropy(model(hidden, mask), labels)


def plot(results: dict, path: str, title: str, panel_titles: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(setting for setting, _ in results))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for (s, method), result in results.items():
            if s != setting:
                continue
            rounds = [0] + [m.round for m in result.history if m.eval]
            acc = [result.initial_eval["accuracy"]] + [m.accuracy for m in result.history if m.eval]
            ax.plot(rounds, acc, marker="o", label=METHODS[method])
        ax.set_title(panel_titles[setting])
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.5, help="local SGD learning rate (reference: 0.5)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    parser.add_argument("--epsilon", type=float, default=6.0, help="per-client DP budget over the whole run")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=2.0, help="per-sample clipping norm C (reference: 2.0)")
    parser.add_argument("--n-train", type=int, default=2400)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--train-layers", type=int, default=1, help="top encoder layers that get LoRA")
    parser.add_argument("--init-A", choices=["kaiming", "orthonormal"], default="kaiming")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=["non-private", "dp"], choices=["non-private", "dp"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="out/fedsvd_accuracy.png")
    parser.add_argument("--cache-dir", default="out", help="where the frozen layers' outputs are cached")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()

    data = assets.rotten_tomatoes(n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    full, tokenizer = assets.minilm_classifier(num_labels=2, seed=args.seed)
    first = len(full.bert.encoder.layer) - args.train_layers
    key = f"{args.n_train}_{args.n_test}_{args.max_length}_{first}_{args.seed}"
    cache = os.path.join(args.cache_dir, f"fedsvd_features_{key}.pt")
    if os.path.exists(cache):
        train_hidden, train_mask, test_hidden, test_mask = torch.load(cache)
    else:
        train_hidden, train_mask = lower_features(full, tokenizer, data.train_text, first, args.max_length)
        test_hidden, test_mask = lower_features(full, tokenizer, data.test_text, first, args.max_length)
        os.makedirs(args.cache_dir, exist_ok=True)
        torch.save((train_hidden, train_mask, test_hidden, test_mask), cache)
    top = TopLayers(full, first).eval()
    with torch.no_grad():  # the split model must be the model: compare with the full forward on a few snippets
        enc = tokenizer(data.test_text[:16], padding="max_length", truncation=True, max_length=args.max_length,
                        return_tensors="pt")
        reference = full.classifier(mean_pool(full.bert(**enc).last_hidden_state, enc["attention_mask"]))
        gap = float((top(test_hidden[:16], test_mask[:16]) - reference).abs().max())
    assert gap < 1e-4, f"cached-feature model differs from the full model by {gap}"
    print(f"features ready in {time.perf_counter() - start:.0f} s (split model = full model to {gap:.1e})")

    width = full.classifier.in_features
    config = specpeft.FedSVDConfig(
        r=args.rank, lora_alpha=args.rank, target_modules=["query", "value", "classifier"],
        rank_pattern={"classifier": width}, alpha_pattern={"classifier": width}, init_A=args.init_A, seed=args.seed,
    )
    model = specpeft.get_adapter_model(top, config)
    initial = read_state(find_lora_factors(model))
    train_labels = torch.tensor(data.train_labels)
    train = TensorDataset(train_hidden, train_mask, train_labels)
    parts = dirichlet_split(train_labels.numpy(), args.clients, alpha=args.alpha, seed=args.seed,
                            min_size=2 * args.batch_size)
    clients = [Subset(train, part.tolist()) for part in parts]
    print("client sizes:", [len(c) for c in clients], "| share of label 1:",
          [round(float(train_labels[p].float().mean()), 2) for p in parts])
    test = TensorDataset(test_hidden, test_mask, torch.tensor(data.test_labels))
    evaluate = classification_eval(test, lambda m, batch: (m(batch[0], batch[1]), batch[2]), batch_size=128)
    local = LocalTraining(steps=args.local_steps, batch_size=args.batch_size, lr=args.lr)
    dp = DPConfig(target_epsilon=args.epsilon, target_delta=args.delta, max_grad_norm=args.clip)

    results = {}
    for setting in args.settings:
        for method in args.methods:
            t0 = time.perf_counter()
            results[(setting, method)] = simulate(
                model, clients, loss_fn, method=method, rounds=args.rounds, clients_per_round=args.per_round,
                local=local, dp=dp if setting == "dp" else None, eval_fn=evaluate, initial_state=initial,
                seed=args.seed,
            )
            final = results[(setting, method)].final_eval()
            seconds = time.perf_counter() - t0
            print(f"{setting:>11} {METHODS[method]:<12} accuracy {final['accuracy']:.3f}  ({seconds:.0f} s)")

    majority = max(np.mean(data.test_labels), 1 - np.mean(data.test_labels))
    print(f"\nMiniLM-L6 + LoRA r={args.rank} (query/value of the top {args.train_layers} layer(s); head rank {width}), "
          f"init A {args.init_A}, Rotten Tomatoes, "
          f"{args.clients} clients (Dirichlet α={args.alpha}), {args.per_round} per round, {args.rounds} rounds × "
          f"{args.local_steps} local steps; test majority class {majority:.3f}, initial accuracy "
          f"{results[next(iter(results))].initial_eval['accuracy']:.3f}\n")
    print(f"| setting | method | final accuracy | best accuracy | final test loss | max client ε (δ={args.delta:g}) "
          "| σ |")
    print("|---|---|---|---|---|---|---|")
    for (setting, method), result in results.items():
        accs = [m.accuracy for m in result.history if m.eval]
        final = result.final_eval()
        eps = f"{result.history[-1].epsilon:.2f} (budget {args.epsilon:g})" if setting == "dp" else "∞"
        sigma = f"{min(p.noise_multiplier for p in result.privacy.values()):.2f}–" \
                f"{max(p.noise_multiplier for p in result.privacy.values()):.2f}" if result.privacy else "0"
        print(f"| {setting} | {METHODS[method]} | {final['accuracy']:.3f} | {max(accs):.3f} | {final['loss']:.3f} "
              f"| {eps} | {sigma} |")
    panels = {"non-private": "non-private", "dp": f"DP-SGD, ε ≤ {args.epsilon:g} per client (δ = {args.delta:g})"}
    plot(results, args.plot, f"MiniLM-L6 on Rotten Tomatoes, {args.clients} non-IID clients", panels)
    print(f"\nplot: {args.plot}   total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
