"""Where one adapted layer's training step spends host and device time (torch.profiler), for chosen variants.

    python benchmarks/profile_layer.py 4096 11008 4096 "peft VeRA,TeRA,SoKA,SNELLA,peft LoRA"   # CUDA, bf16

Arguments: d_out d_in T and a comma list of label prefixes from `speed.py`'s variants (the same builds: the base
weight on the device in bf16, then each library adds its adapter; on CUDA each of ours also forced to the backend
"auto" does not pick, labelled "[torch]" or "[triton]"). Per variant it prints the step time (10 queued steps between
synchronizes, best of 3), the host time to queue one step without synchronizing, the kernel launches per step, and
the profiler's table sorted by device time. CUDA only: on CPU every op is both host and device time.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import speed  # noqa: E402

LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("d_out", type=int)
    parser.add_argument("d_in", type=int)
    parser.add_argument("tokens", type=int)
    parser.add_argument("methods", help="comma list of variant label prefixes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_layer.py: needs CUDA (host and device time are the same thing on CPU).")
    warnings.filterwarnings("ignore")
    prefixes = args.methods.split(",")
    soka_count = speed.soka_trainable(args.d_out, args.d_in)
    specs = [v for v in speed.variants(args.d_out, args.d_in, soka_count, "cuda")
             if any(v.label.startswith(p) for p in prefixes)]
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, args.d_out, device="cuda", dtype=torch.bfloat16)
    for variant in specs:
        model = variant.build(speed._copy(torch.nn.Linear(args.d_in, args.d_out)).to("cuda", torch.bfloat16))
        for _ in range(3):
            _harness.fwd_bwd_seconds(model, x, grad)
        step = min(_harness.fwd_bwd_seconds(model, x, grad, 10) for _ in range(3))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            model.zero_grad(set_to_none=True)
            x.grad = None
            model(x).backward(grad)
        host = (time.perf_counter() - start) / 10  # no synchronize inside: the host's cost of queueing a step
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                _harness.fwd_bwd_seconds(model, x, grad)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in LAUNCH_EVENTS) / 5
        print(f"\n=== {variant.label}: step {step * 1e3:.3f} ms, host queue {host * 1e3:.3f} ms, "
              f"launches {launches:.0f}/step")
        print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
