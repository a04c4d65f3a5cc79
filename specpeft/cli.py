"""The `specpeft` command: merge an adapter into its base, convert it to a stock LoRA, or inspect it.

    specpeft merge   --base DIR --adapter DIR --out DIR [--dtype auto|fp32|bf16|fp16] [--overwrite]
    specpeft to-lora --adapter DIR --out DIR (--rank N | --energy E) [--base DIR] [--overwrite]
    specpeft inspect --adapter DIR [--base DIR] [--plot FILE.png] [--json FILE]

No model is instantiated: every verb works on the saved files (merge/state_dict.py). Errors print one line naming
the file/key and the fix, and exit with status 1; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Optional, Sequence

# Bad inputs and I/O failures (missing/corrupted files, a full disk) get a one-line message; anything else is a bug
# and keeps its traceback.
_EXPECTED_ERRORS = (ValueError, KeyError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specpeft",
        description="Export and inspect specpeft / peft adapters without loading the model.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{merge,to-lora,inspect}")

    merge = verbs.add_parser(
        "merge", help="write base + ΔW as a model directory that transformers' from_pretrained loads",
        description="Merge a saved adapter into a saved base model, streaming shard by shard (peak memory about one "
                    "layer). The output mirrors the base's safetensors shards and index and copies its config and "
                    "tokenizer files. A bitsandbytes checkpoint as base merges into a dequantized copy.",
    )
    merge.add_argument("--base", required=True, help="base model directory (safetensors, sharded or not)")
    merge.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + weights)")
    merge.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    merge.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="dtype of floating tensors in the output; auto keeps each tensor's dtype (default)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")

    to_lora = verbs.add_parser(
        "to-lora", help="convert any adapter into a stock PEFT LoRA (exact when rank(ΔW) ≤ N)",
        description="Factor each layer's ΔW by SVD into LoRA A, B (lora_alpha = r). Exact when rank(ΔW) ≤ N "
                    "(SVFit, FedSVD); a truncation otherwise, with the per-layer relative error printed and written "
                    "to conversion_report.json in --out.",
    )
    to_lora.add_argument("--adapter", required=True, help="adapter directory")
    to_lora.add_argument("--out", required=True, help="output LoRA directory (must not exist or be empty)")
    size = to_lora.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="LoRA rank N (per group for grouped convs)")
    size.add_argument("--energy", type=float, help="per-layer rank keeping this fraction of Σσ², e.g. 0.99")
    to_lora.add_argument("--base", help="base model directory (needed for DoRA; checks the layers against it)")
    to_lora.add_argument("--svd", default="randomized", choices=["randomized", "full"],
                         help="SVD for --rank: randomized (default; exact when rank(ΔW) ≤ N, much faster on large "
                              "layers) or full (the optimal truncation); the reported error is always measured")
    to_lora.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    to_lora.add_argument("--quiet", action="store_true", help="no progress bars")

    inspect = verbs.add_parser(
        "inspect", help="per-layer trainable counts, ‖ΔW‖, effective rank and a spectrum plot",
        description="Print the adapter's method, targets and, per layer: trainable parameters, ‖ΔW‖_F, σ_1, "
                    "numerical rank and entropy effective rank (and ‖ΔW‖/‖W‖ with --base).",
    )
    inspect.add_argument("--adapter", required=True, help="adapter directory")
    inspect.add_argument("--base", help="base model directory (adds ‖W‖_F and ‖ΔW‖_F/‖W‖_F)")
    inspect.add_argument("--plot", metavar="FILE.png", help="save the ΔW singular spectra per layer")
    inspect.add_argument("--json", metavar="FILE", help="write the statistics as JSON")
    inspect.add_argument("--overwrite", action="store_true", help="replace an existing --plot / --json file")
    inspect.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (0 on success, 1 on an error, with a one-line message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verb == "merge":
            return _merge(args)
        if args.verb == "to-lora":
            return _to_lora(args)
        return _inspect(args)
    except _EXPECTED_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"specpeft {args.verb}: error: {message}", file=sys.stderr)
        if os.environ.get("SPECPEFT_DEBUG"):
            raise
        return 1


def _merge(args: argparse.Namespace) -> int:
    from .merge.export import merge_adapter

    result = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
                           progress=not args.quiet)
    print(f"merged {len(result.merged)} layers into {result.out} ({result.shards} shard(s), "
          f"{result.total_bytes / 2**20:.1f} MiB, dtype {result.dtype}, {result.seconds:.1f} s)")
    if result.replaced:
        print(f"replaced by saved modules: {', '.join(result.replaced)}")
    if result.dequantized:
        print(f"dequantized bitsandbytes weights: {len(result.dequantized)}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _to_lora(args: argparse.Namespace) -> int:
    from .init.svd import SVDInit
    from .merge.lora import REPORT_NAME, convert_to_lora

    report = convert_to_lora(args.adapter, args.out, rank=args.rank, energy=args.energy, base=args.base,
                             overwrite=args.overwrite, svd=SVDInit(kind=args.svd), progress=not args.quiet)
    width = max(len(layer.name) for layer in report.layers)
    print(f"{'layer'.ljust(width)}  rank  rel.error")
    for layer in report.layers:
        print(f"{layer.name.ljust(width)}  {layer.rank:>4}  {layer.relative_error:.3e}")
    print(f"converted {len(report.layers)} {report.source_method} layers to LoRA in {report.out} "
          f"(max relative error {report.max_relative_error:.3e}; report: {os.path.join(report.out, REPORT_NAME)})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .merge.inspection import format_summary, inspect_adapter, plot_spectra
    from .merge.output import check_file_output, staged_file

    inputs = [args.adapter, args.base]
    if args.plot and not os.path.splitext(args.plot)[1]:
        args.plot += ".png"  # what matplotlib writes for a name without a format
    outputs = [(what, path) for what, path in (("--json", args.json), ("--plot", args.plot)) if path]
    for what, path in outputs:  # refused before the work, as merge refuses its --out
        check_file_output(path, args.overwrite, inputs, what)
    summary = inspect_adapter(args.adapter, base=args.base, progress=not args.quiet)
    print(format_summary(summary))
    with contextlib.ExitStack() as stack:  # both files are renamed into place only if both were written
        staged = {what: stack.enter_context(staged_file(path, args.overwrite, inputs, what)) for what, path in outputs}
        if args.json:
            with open(staged["--json"], "w") as fh:
                json.dump(summary.to_dict(), fh, indent=2)
        if args.plot:
            plot_spectra(summary, staged["--plot"])
    if args.json:
        print(f"statistics written to {args.json}")
    if args.plot:
        print(f"spectra plotted to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
