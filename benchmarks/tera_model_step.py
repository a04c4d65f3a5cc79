"""TeRA against peft VeRA on a whole model (MiniLM-L6, or a Llama at LLM widths): training-step time ÷ the frozen model.

    python benchmarks/tera_model_step.py              # batch 8 × 128 tokens, 15 rounds (≈ 2 min on 2 cores)
    python benchmarks/tera_model_step.py --quick      # 3 rounds
    python benchmarks/tera_model_step.py --model llama --device cuda --batch 4 --tokens 2048 \
        --stem tera_model_step_llama_cuda                    # bf16 on a GPU, 8K tokens per layer call
    python benchmarks/tera_model_step.py --compile --rounds 9 --stem tera_model_step_compiled   # + torch.compile rows
    python benchmarks/tera_model_step.py --batch 4 --tokens 64 --paths --stem tera_model_step_4x64   # + forced paths

The model is the pretrained MiniLM-L6 encoder of the README's quality task (examples/assets.py, offline), every
query/key/value/dense layer adapted, fed `inputs_embeds` that require grad, and timed as `out.backward(g)`
round-robin per round (`_harness.interleaved_times`), each ratio taken within a round (`_harness.paired_ratio`).
`--model llama` times a 4-layer LlamaModel at 2048 hidden / 5504 FFN with seeded random weights (the weights do not
change the time), every q/k/v/o/gate/up/down projection adapted; on CUDA the Triton kernels "auto" does not pick are
timed too ("[triton]"). `--compile` adds the frozen model, TeRA default and VeRA r = 16 under `torch.compile`
(inductor, static shapes; compiled in the warm-up steps), whose ratios are taken against the compiled frozen model and
compiled VeRA.
Throughput is the inverse of the step time, so "÷ VeRA" below 1 means TeRA trains faster. Variants: TeRA's default,
the same with a network node per layer instead of one per bucket and pass (`TeRAConfig.batch_networks=False`), the
balanced-modes layout it replaced (with `--paths`, the default with every layer forced onto the factored or the merged
path), peft VeRA r = 16, its default r = 256, and the VeRA whose trainable count is closest to TeRA default's (VeRA
trains d_out + r per layer, so r = 1 whenever TeRA trains fewer than Σ d_out + layers).
Results: benchmarks/results/tera_model_step.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
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

class EmbeddingsIn(nn.Module):
    """An encoder fed `inputs_embeds` (so x.requires_grad reaches every layer), returning the last hidden state."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=x).last_hidden_state


PLACE = {"device": "cpu", "dtype": torch.float32}  # set from --device before any model is built


def minilm() -> nn.Module:
    """The pretrained MiniLM-L6 encoder (eval mode in `base_model`: no dropout noise in the timings)."""
    return assets.minilm_classifier(num_labels=2, seed=0)[0].bert


def llama() -> nn.Module:
    """A Llama decoder at LLM widths (2048 hidden, 5504 FFN, 4 layers), seeded random weights: step time does not
    depend on the values, and no hub download is needed."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16,
                                  num_key_value_heads=16, vocab_size=256, max_position_embeddings=8192))


MODELS = {  # name -> (builder, adapted linears, hidden size, title)
    "minilm": (minilm, ["query", "key", "value", "dense"], 384, "MiniLM-L6"),
    "llama": (llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2048,
              "a 4-layer Llama at 2048 hidden (random weights)"),
}
MODEL = dict(zip(("build", "targets", "hidden", "title"), MODELS["minilm"]))  # set from --model


def base_model() -> nn.Module:
    """The chosen model, frozen, in eval mode, on PLACE's device and dtype before any adapter is added (as a user
    would)."""
    return MODEL["build"]().eval().requires_grad_(False).to(PLACE["device"], PLACE["dtype"])


def adapted_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] in MODEL["targets"]]


def tera(balanced: bool, backend: str = "auto", batch_networks: bool = True, forward_mode: str = "auto") -> nn.Module:
    model = base_model()
    modes = _harness.balanced_tera_modes(adapted_shapes(model)) if balanced else {}
    config = specpeft.TeRAConfig(target_modules=MODEL["targets"], mode_sizes=modes, kernel_backend=backend,
                                 batch_networks=batch_networks, forward_mode=forward_mode)
    return EmbeddingsIn(specpeft.get_adapter_model(model, config))


def vera(rank: int) -> nn.Module:
    from peft import VeraConfig, get_peft_model

    return EmbeddingsIn(get_peft_model(base_model(), VeraConfig(r=rank, target_modules=MODEL["targets"])))


def trainable(model: nn.Module) -> int:
    return _harness.count(p for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="sequence length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm",
                        help="minilm (pretrained, offline) or llama (LLM widths, random weights)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16, --steps queued per timing)")
    parser.add_argument("--steps", type=int, default=10, help="CUDA: steps queued between synchronizes per timing")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--stem", default=None, help="results file stem (default tera_model_step[_quick])")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd frozen / TeRA / VeRA r=16 rows")
    parser.add_argument("--paths", action="store_true",
                        help="add TeRA default with every layer forced factored / merged (TeRAConfig.forward_mode)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    on_cuda = args.device == "cuda"
    PLACE.update(device=args.device, dtype=torch.bfloat16 if on_cuda else torch.float32)
    MODEL.update(zip(("build", "targets", "hidden", "title"), MODELS[args.model]))
    rounds = 3 if args.quick else args.rounds
    header = _harness.run_header("tera_model_step", None)
    start = time.perf_counter()

    models = {"frozen model": EmbeddingsIn(base_model()), "TeRA default": tera(balanced=False),
              "TeRA default, per-layer networks": tera(balanced=False, batch_networks=False),
              "TeRA balanced modes": tera(balanced=True), "peft VeRA r=16": vera(16), "peft VeRA r=256": vera(256)}
    shapes = adapted_shapes(models["frozen model"].encoder)
    matched_rank = _harness.matched_vera_rank(trainable(models["TeRA default"]), (o for o, _ in shapes),
                                              min(min(shape) for shape in shapes))
    models[f"peft VeRA count-matched (r={matched_rank})"] = vera(matched_rank)
    if on_cuda:  # the kernel backend "auto" does not pick there
        other = "torch" if specpeft.get_method(specpeft.TeRAConfig).adapter_cls.triton_by_default else "triton"
        models[f"TeRA default [{other}]"] = tera(balanced=False, backend=other)
    if args.paths:  # what "auto"'s per-layer token-count switch is up against
        models["TeRA default, factored forced"] = tera(balanced=False, forward_mode="factored")
        models["TeRA default, merged forced"] = tera(balanced=False, forward_mode="materialized")
    if args.compile:
        for label in ("frozen model", "TeRA default", "peft VeRA r=16"):
            models[f"{label} [compiled]"] = torch.compile(models[label], dynamic=False)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.tokens, MODEL["hidden"], generator=gen).to(**PLACE).requires_grad_(True)
    grad = torch.randn(args.batch, args.tokens, MODEL["hidden"], generator=gen).to(**PLACE)
    times = _harness.interleaved_times(models, x, grad, repeats=rounds, warmup=2, steps=args.steps if on_cuda else 1)
    header["wall_s"] = time.perf_counter() - start

    matched = f"peft VeRA count-matched (r={matched_rank})"
    rows = []
    for label, model in models.items():
        tag = " [compiled]" if label.endswith(" [compiled]") else ""  # compiled rows against compiled rows
        pairs = {"vs_frozen": (label, "frozen model" + tag), "vs_vera16": (label, "peft VeRA r=16" + tag),
                 "vs_matched": None if tag else (label, matched)}
        rows.append({"variant": label, "trainable": trainable(model), "ms": 1e3 * statistics.median(times[label]),
                     **_harness.ratio_columns(times, pairs)})
    lines = [
        f"# TeRA vs peft VeRA: training step of {MODEL['title']}", "",
        _harness.header_markdown(header, f"Batch {args.batch} × {args.tokens} tokens, {str(PLACE['dtype'])[6:]} on "
                                 f"{args.device}, every {'/'.join(MODEL['targets'])} layer adapted; {rounds} "
                                 "round-robin rounds after 2 warm-up"
                                 + (f" ({args.steps} steps queued per timing)" if on_cuda else "")
                                 + ". Step ms: median over rounds. Ratios: median over rounds of the per-round "
                                 "ratio of the two variants' times, with a 95 % bootstrap interval of that median in "
                                 "brackets "
                                 f"(`_harness.paired_ratio`; none below {_harness.INTERVAL_MIN_ROUNDS} rounds)."),
        "| variant | trainable | step ms | ÷ frozen model | ÷ VeRA r=16 | ÷ VeRA count-matched |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['trainable']:,} | {r['ms']:.1f} | "
              + _harness.ratio_cells(r, ("vs_frozen", "vs_vera16", "vs_matched")) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    stem = args.stem or ("tera_model_step_quick" if args.quick else "tera_model_step")
    _harness.write_outputs(Path(args.out) if args.out else _harness.RESULTS, stem, table,
                           {"header": header, "args": vars(args), "rows": rows, "times": times})


if __name__ == "__main__":
    main()
