"""TeRA against peft VeRA on a whole model: training-step time of MiniLM-L6, ÷ the frozen model.

    python benchmarks/tera_model_step.py              # batch 8 × 128 tokens, 15 rounds (≈ 2 min on 2 cores)
    python benchmarks/tera_model_step.py --quick      # 3 rounds

The model is the pretrained MiniLM-L6 encoder of the README's quality task (examples/assets.py, offline), every
query/key/value/dense layer adapted, fed `inputs_embeds` that require grad, and timed as `out.backward(g)` round-robin per round (`_harness.interleaved_medians`).
Throughput is the inverse of the step time, so "÷ VeRA" below 1 means TeRA trains faster. Variants: TeRA's default,
the balanced-modes layout it replaced, peft VeRA r = 16, its default r = 256, and the VeRA whose trainable count is
closest to TeRA default's (VeRA trains d_out + r per layer, so r = 1 whenever TeRA trains fewer than Σ d_out + layers).
Results: benchmarks/results/tera_model_step.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import assets  # noqa: E402
import specpeft  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]


class EmbeddingsIn(nn.Module):
    """BERT fed `inputs_embeds` (so x.requires_grad reaches every layer), returning the last hidden state."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bert(inputs_embeds=x).last_hidden_state


def minilm() -> nn.Module:
    """The pretrained MiniLM-L6 encoder, frozen, in eval mode (no dropout noise in the timings)."""
    return assets.minilm_classifier(num_labels=2, seed=0)[0].bert.eval().requires_grad_(False)


def adapted_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] in TARGETS]


def tera(balanced: bool) -> nn.Module:
    model = minilm()
    modes = _harness.balanced_tera_modes(adapted_shapes(model)) if balanced else {}
    return EmbeddingsIn(specpeft.get_adapter_model(model, specpeft.TeRAConfig(target_modules=TARGETS, mode_sizes=modes)))


def vera(rank: int) -> nn.Module:
    from peft import VeraConfig, get_peft_model

    return EmbeddingsIn(get_peft_model(minilm(), VeraConfig(r=rank, target_modules=TARGETS)))


def trainable(model: nn.Module) -> int:
    return _harness.count(p for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="sequence length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stem", default=None, help="results file stem (default tera_model_step[_quick])")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rounds = 3 if args.quick else args.rounds
    header = _harness.run_header("tera_model_step", None)
    start = time.perf_counter()

    models = {"frozen model": EmbeddingsIn(minilm()), "TeRA default": tera(balanced=False),
              "TeRA balanced modes": tera(balanced=True), "peft VeRA r=16": vera(16), "peft VeRA r=256": vera(256)}
    shapes = adapted_shapes(models["frozen model"].bert)
    matched_rank = _harness.matched_vera_rank(trainable(models["TeRA default"]), (o for o, _ in shapes),
                                              min(min(shape) for shape in shapes))
    models[f"peft VeRA count-matched (r={matched_rank})"] = vera(matched_rank)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.tokens, 384, generator=gen).requires_grad_(True)
    grad = torch.randn(args.batch, args.tokens, 384, generator=gen)
    seconds = _harness.interleaved_medians(models, x, grad, repeats=rounds, warmup=2)
    header["wall_s"] = time.perf_counter() - start

    base = seconds["frozen model"]
    vera16, matched = seconds["peft VeRA r=16"], seconds[f"peft VeRA count-matched (r={matched_rank})"]
    rows = [{"variant": label, "trainable": trainable(model), "ms": 1e3 * seconds[label],
             "vs_frozen": seconds[label] / base, "vs_vera16": seconds[label] / vera16,
             "vs_matched": seconds[label] / matched} for label, model in models.items()]
    lines = [
        "# TeRA vs peft VeRA: training step of MiniLM-L6", "",
        _harness.header_markdown(header, f"Batch {args.batch} × {args.tokens} tokens, fp32, every query/key/value/"
                                 f"dense layer adapted; median of {rounds} round-robin rounds after 2 warm-up."),
        "| variant | trainable | step ms | ÷ frozen model | ÷ VeRA r=16 | ÷ VeRA count-matched |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['trainable']:,} | {r['ms']:.1f} | {r['vs_frozen']:.2f} | {r['vs_vera16']:.2f} | "
              f"{r['vs_matched']:.2f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    stem = args.stem or ("tera_model_step_quick" if args.quick else "tera_model_step")
    _harness.write_outputs(_harness.RESULTS, stem, table, {"header": header, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
