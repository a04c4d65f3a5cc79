"""Shared measurement plumbing of the benchmark scripts: run header, layer timing, paired time ratios with bootstrap
intervals, memory probe, output files.

Not a benchmark itself. Everything here is measurement plumbing; the methods and their configs live in the scripts.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def run_header(title: str, argv: list[str] | None) -> dict[str, Any]:
    """Exact command, machine, threads, load average and UTC date of this run (written at the top of every table)."""
    script = os.path.relpath(sys.argv[0]) if argv is None else f"benchmarks/{title}.py"
    args = sys.argv[1:] if argv is None else argv
    import peft

    return {
        "command": " ".join(["python", script, *map(shlex.quote, args)]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, peft {peft.__version__}",
    }


def header_markdown(header: dict[str, Any], extra: str = "") -> str:
    """The header block as markdown lines."""
    load = ", ".join(f"{v:.2f}" for v in header["load_average"])
    lines = [
        f"Command: `{header['command']}`  ",
        f"Machine: {header['machine']}; torch threads {header['threads']}; load average at start {load}"
        + (f" (at end {', '.join(f'{v:.2f}' for v in header['load_average_end'])})" if "load_average_end" in header
           else "") + "  ",
        f"Date: {header['date']}; {header['versions']}" + (f"; wall time {header['wall_s']:.0f} s" if "wall_s" in header
                                                           else ""),
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def count(params: Iterable[nn.Parameter]) -> int:
    """Number of scalars over distinct parameters."""
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages among `tensors` (non-tensors ignored)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the CPU allocator's running total during `step`, relative to its start (torch.profiler).

    CPU torch has no `max_memory_allocated`; the profiler's allocation events carry the allocator's running total
    (same method as benchmarks/snella_memory.py). On CUDA, use torch.cuda.max_memory_allocated instead.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def write_outputs(out_dir: Path, stem: str, table: str, payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write `<stem>.md` and `<stem>.json` under out_dir; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(table)
    js.write_text(json.dumps(payload, indent=1, default=str))
    return md, js


# -- one-layer timing ---------------------------------------------------------------------------------------------


class OneLayer(nn.Module):
    """The benchmarked layer as the only child "lin", so both libraries wrap it as they wrap real models."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.lin = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def fwd_bwd_seconds(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, steps: int = 1) -> float:
    """Seconds per `model(x).backward(grad)` (x.requires_grad: the layer sits inside a network), averaged over
    `steps` back-to-back steps. On CUDA the steps are queued between two synchronizes, so a sub-millisecond step
    is timed as the device runs it rather than as one launch-bound round trip."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        if step:  # fresh gradients every step, as in training; the first step's clearing is outside the timer
            model.zero_grad(set_to_none=True)
            x.grad = None
        model(x).backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def interleaved_times(models: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, repeats: int,
                      warmup: int, progress: bool = False, steps: int = 1) -> dict[str, list[float]]:
    """Fwd+bwd seconds per model and repeat, all models timed round-robin in every round with the order rotated, so
    machine load drifts hit every variant alike (the ratios are what the benchmarks report). Each timing averages
    `steps` steps (`fwd_bwd_seconds`)."""
    labels = list(models)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for step in range(warmup + repeats):
        for label in labels[step % len(labels):] + labels[: step % len(labels)]:
            elapsed = fwd_bwd_seconds(models[label], x, grad, steps)
            if step >= warmup:
                times[label].append(elapsed)
        if progress:
            print(f"  round {step + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)
    return times


def interleaved_medians(models: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, repeats: int,
                        warmup: int, progress: bool = False, steps: int = 1) -> dict[str, float]:
    """Median of `interleaved_times` per model."""
    times = interleaved_times(models, x, grad, repeats, warmup, progress, steps)
    return {label: statistics.median(values) for label, values in times.items()}


INTERVAL_MIN_ROUNDS = 9  # below this a bootstrap interval of the median is little more than the min and max


def paired_ratio(times: dict[str, list[float]], label: str, reference: str,
                 resamples: int = 2000) -> dict[str, float | None]:
    """`label`'s time ÷ `reference`'s per round of `interleaved_times`: the median over rounds of these per-round
    ratios and a 95 % percentile-bootstrap interval of that median (rounds resampled with a fixed seed; None with fewer
    than `INTERVAL_MIN_ROUNDS` rounds).

    The two run in the same round, seconds apart, so load that drifts between rounds cancels in each ratio, which a
    ratio of the two medians does not do; the interval says how much of the ratio the machine's noise leaves open.
    """
    ratios = [mine / theirs for mine, theirs in zip(times[label], times[reference], strict=True)]
    median = statistics.median(ratios)
    if len(ratios) < INTERVAL_MIN_ROUNDS:
        return {"median": median, "low": None, "high": None}
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    outside = round(0.025 * (resamples - 1))  # resampled medians left out on each side
    return {"median": median, "low": medians[outside], "high": medians[resamples - 1 - outside]}


def interval(ratio: dict[str, float | None] | None) -> list[float] | None:
    """[low, high] of a `paired_ratio`, or None (no ratio, or too few rounds for an interval)."""
    return None if ratio is None or ratio["low"] is None else [ratio["low"], ratio["high"]]


def ratio_columns(times: dict[str, list[float]],
                  pairs: dict[str, tuple[str, str] | None]) -> dict[str, Any]:
    """A results row's ratio columns: for each key a (label, reference) `paired_ratio`'s median under the key (None
    for no pair) and every interval under "intervals" (`interval`), as the scripts' JSON rows hold them."""
    ratios = {key: None if pair is None else paired_ratio(times, *pair) for key, pair in pairs.items()}
    return {**{key: None if ratio is None else ratio["median"] for key, ratio in ratios.items()},
            "intervals": {key: interval(ratio) for key, ratio in ratios.items()}}


def ratio_cells(row: dict[str, Any], keys: Iterable[str]) -> str:
    """The " | "-joined table cells (`ratio_cell`) of a `ratio_columns` row's keys."""
    return " | ".join(ratio_cell(row[key], *(row["intervals"][key] or ())) for key in keys)


def ratio_cell(ratio: float | None, low: float | None = None, high: float | None = None) -> str:
    """A table cell "1.07 [1.02, 1.11]" for a `paired_ratio` median and interval, "1.07" without an interval, "—" for
    no ratio."""
    if ratio is None:
        return "—"
    return f"{ratio:.2f}" if low is None else f"{ratio:.2f} [{low:.2f}, {high:.2f}]"


def lokr_params(d_out: int, d_in: int, factor: int, r: int, both: bool) -> int:
    """Trainable count of peft LoKr on a Linear (peft/tuners/lokr/layer.py update_layer + create_adapter_parameters)."""
    from peft.tuners.lokr.layer import factorization

    in_m, in_n = factorization(d_in, factor)
    out_l, out_k = factorization(d_out, factor)
    use_w1 = not (both and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    w1 = out_l * in_m if use_w1 else r * (out_l + in_m)
    w2 = out_k * in_n if use_w2 else r * (out_k + in_n)
    return w1 + w2


def matched_lokr(d_out: int, d_in: int, target: int) -> dict[str, Any]:
    """The LoKr (decompose_factor, r, decompose_both) whose trainable count is closest to `target`."""
    grid = itertools.product([-1, 2, 4, 8, 16, 32, 64, 128, 256], [1, 2, 4, 8, 16, 32, 64, 128, 256], [False, True])
    best = min(grid, key=lambda c: (abs(lokr_params(d_out, d_in, *c) - target), c[1]))
    return {"decompose_factor": best[0], "r": best[1], "decompose_both": best[2]}


def matched_vera_rank(target: int, d_outs: Iterable[int], max_rank: int) -> int:
    """The peft VeRA r whose trainable count Σ (d_out + r) over the adapted layers is closest to `target` (r ≥ 1)."""
    d_outs = list(d_outs)
    return min(max(1, round((target - sum(d_outs)) / len(d_outs))), max_rank)


def balanced_tera_modes(shapes: Iterable[tuple[int, int]], order: int = 3) -> dict[str, list[list[int]]]:
    """`TeRAConfig.mode_sizes` pinning spec §1.3's balanced modes (TeRA's default layout before the P ⊗ M_N one)."""
    from specpeft.init.tucker import balanced_factors

    return {f"{o}x{i}": [list(balanced_factors(o, order)), list(balanced_factors(i, order))] for o, i in shapes}
