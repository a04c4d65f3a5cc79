"""SNELLA vs peft LoRA (same low-rank dim d) vs dense sparse-masked full-weight tuning: peak memory and step time.

    python benchmarks/snella_memory.py            # 8-layer SmolLM2-width decoder + one 4096×4096 layer (~4 min)
    python benchmarks/snella_memory.py --quick    # 4-layer 256-wide decoder + one 1024×1024 layer (< 1 min)

Setups (random init, no hub access; AdamW, fp32, CPU, torch.set_num_threads(2)):
- model: a LlamaForCausalLM with SmolLM2-135M's block widths (hidden 576, intermediate 1536, 9 heads / 3 kv heads;
  --layers of them, vocab --vocab), every q/k/v/o/gate/up/down projection adapted, causal-LM loss on random ids;
- layer: one nn.Linear(n, m) adapted, loss = ‖y‖², input (T, n) requiring grad as inside a network.
Methods: `lora` = peft LoraConfig(r=d); `snella` = SNELLAConfig(low_rank_dim=d, kernel "snella", mask "code",
sparsity s); `dense_masked` = the SPT-style baseline SNELLA's memory claim is against (spec §3.4, anchors §4.2): the
target weights themselves trainable, their gradient multiplied by a fixed random mask keeping the same (1 − s)
fraction, AdamW state on the full weights; `frozen` = the model in inference (no_grad forward), for scale.

Memory (CPU has no max_memory_allocated, so it is measured from the allocator itself):
- resident = bytes of every parameter, buffer, optimizer-state tensor and gradient mask alive between steps
  (optimizer state exists after the warm-up steps; grads are freed by zero_grad(set_to_none=True));
- step peak = the maximum of the CPU allocator's running total over one full training step (forward, backward,
  optimizer.step, zero_grad), read from torch.profiler's allocation events (`profile_memory=True`), relative to the
  step's start: activations, gradients and every transient (SNELLA's m×n kernel buffers included);
- peak = resident + step peak; also the bytes autograd saves in the forward (saved_tensors_hooks, parameters excluded).
Time: median wall and process-CPU seconds per training step over --repeats steps after 2 warm-up steps.
Targets (issue 7): SNELLA peak ≤ 1.2× LoRA peak; SNELLA peak ≥ 30 % below dense_masked.
Results: benchmarks/results/snella_memory{,_quick}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import specpeft  # noqa: E402
from specpeft import SNELLAConfig  # noqa: E402

TARGETS = {"vs_lora": 1.2, "vs_dense_saving": 0.30}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- measurement ------------------------------------------------------------------------------------------------


def saved_activation_bytes(forward: Callable[[], torch.Tensor], params: set[int]) -> int:
    """Bytes autograd saves during `forward` (unique storages; parameters/buffers, saved by reference, excluded)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(saved.values())


def measure(name: str, model: nn.Module, loss_fn: Callable[[], torch.Tensor], extra: list[torch.Tensor],
            repeats: int) -> dict:
    """Train `model` with AdamW for 2 + repeats steps; memory and time as described in the module docstring."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    resident = _harness.tensor_bytes([*model.parameters(), *model.buffers(), *state, *extra])
    params = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = saved_activation_bytes(loss_fn, params)
    peak = _harness.step_peak_bytes(step)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    row = {
        "method": name, "trainable": sum(p.numel() for p in trainable), "resident_bytes": resident,
        "optimizer_state_bytes": _harness.tensor_bytes(state), "saved_activation_bytes": saved, "step_peak_bytes": peak,
        "peak_bytes": resident + peak, "step_s": statistics.median(walls), "step_cpu_s": statistics.median(cpus),
        "step_s_all": walls,
    }
    print(f"  {name:13s} peak {row['peak_bytes'] / 2**20:8.1f} MiB (resident {resident / 2**20:7.1f}, step "
          f"{peak / 2**20:7.1f}, saved {saved / 2**20:6.1f})  step {row['step_s']:.3f} s", flush=True)
    return row


def frozen_row(model: nn.Module, forward: Callable[[], torch.Tensor]) -> dict:
    with torch.no_grad():
        forward()
        peak = _harness.step_peak_bytes(forward)
    resident = _harness.tensor_bytes([*model.parameters(), *model.buffers()])
    walls = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            forward()
            walls.append(time.perf_counter() - start)
    print(f"  {'frozen (fwd)':13s} peak {(resident + peak) / 2**20:8.1f} MiB", flush=True)
    return {"method": "frozen", "trainable": 0, "resident_bytes": resident, "optimizer_state_bytes": 0,
            "saved_activation_bytes": 0, "step_peak_bytes": peak, "peak_bytes": resident + peak,
            "step_s": statistics.median(walls), "step_cpu_s": None, "step_s_all": walls}


# -- methods ----------------------------------------------------------------------------------------------------


def apply_method(method: str, model: nn.Module, targets: list[str], d: int, sparsity: float) -> tuple[nn.Module, list]:
    """The model with `method` applied, and extra tensors it keeps alive (the dense baseline's masks)."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=d, lora_alpha=d, target_modules=targets, lora_dropout=0.0)), []
    if method == "snella":
        config = SNELLAConfig(target_modules=targets, low_rank_dim=d, init_sparsity=sparsity, init_scale=1.0)
        return specpeft.get_adapter_model(model, config), []
    if method == "dense_masked":
        model.requires_grad_(False)
        masks, gen = [], torch.Generator().manual_seed(0)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                mask = torch.rand(module.weight.shape, generator=gen) >= sparsity  # keeps a (1 − s) fraction
                module.weight.requires_grad_(True)
                module.weight.register_hook(lambda g, mask=mask: g * mask)  # the sparse update: masked gradient
                masks.append(mask)
        return model, masks
    raise ValueError(method)


def tiny_llama(layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


class OneLayer(nn.Module):
    def __init__(self, m: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def bench_model(args: argparse.Namespace) -> list[dict]:
    dims = (4, 256, 688, 4, 2, 2048) if args.quick else (args.layers, 576, 1536, 9, 3, args.vocab)
    print(f"[model] llama layers={dims[0]} hidden={dims[1]} inter={dims[2]} vocab={dims[5]}, "
          f"batch {args.batch}×{args.seq}", flush=True)
    ids = torch.randint(0, dims[5], (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    rows = []
    base = tiny_llama(*dims).requires_grad_(False)
    rows.append(frozen_row(base, lambda: base(input_ids=ids).logits))
    for method in ("lora", "snella", "dense_masked"):
        model, extra = apply_method(method, tiny_llama(*dims).requires_grad_(False), PROJECTIONS, args.d, args.sparsity)
        rows.append(measure(method, model, lambda m=model: m(input_ids=ids, labels=ids).loss, extra, args.repeats))
        del model, extra
    return rows


def bench_layer(args: argparse.Namespace) -> list[dict]:
    m = n = 1024 if args.quick else args.layer_dim
    tokens = 256 if args.quick else args.tokens
    print(f"[layer] {m}×{n}, {tokens} tokens", flush=True)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    rows = []
    for method in ("lora", "snella", "dense_masked"):
        torch.manual_seed(0)
        model, extra = apply_method(method, OneLayer(m, n).requires_grad_(False), ["proj"], args.d, args.sparsity)
        rows.append(measure(method, model, lambda m_=model: m_(x).pow(2).sum(), extra, args.repeats))
        del model, extra
    return rows


# -- report -----------------------------------------------------------------------------------------------------


def markdown(results: dict, meta: dict) -> str:
    ok = lambda b: "✅" if b else "❌"  # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "# SNELLA memory and step time vs peft LoRA and dense sparse-masked tuning",
        "",
        f"`python benchmarks/snella_memory.py{' --quick' if meta['quick'] else ''}` — torch {meta['torch']}, "
        f"{meta['threads']} threads, fp32 CPU, d = {meta['d']}, sparsity {meta['sparsity']} (SNELLA kernel 'snella', "
        f"mask 'code'; dense_masked keeps the same fraction), AdamW, {meta['repeats']} timed steps (median). "
        f"{meta['date']}; load average {meta['load_start']:.1f} → {meta['load_end']:.1f} on {os.cpu_count()} cores.",
        "",
        "Peak = resident (params + buffers + AdamW state + masks) + step peak (allocator high-water mark over one "
        "step, from torch.profiler allocation events). Saved = bytes autograd saves in the forward (params excluded).",
    ]
    for key, title in (("model", "Model"), ("layer", "Single layer")):
        rows = {r["method"]: r for r in results[key]}
        lines += ["", f"## {title}: {results[key + '_desc']}", "",
                  "| method | trainable | resident MiB | AdamW state MiB | saved MiB | step peak MiB | **peak MiB** "
                  "| peak ÷ LoRA | peak ÷ dense_masked | step s (wall / CPU) | step ÷ LoRA |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results[key]:
            lines.append(
                f"| {r['method']} | {r['trainable']:,} | {mib(r['resident_bytes'])} | {mib(r['optimizer_state_bytes'])} "
                f"| {mib(r['saved_activation_bytes'])} | {mib(r['step_peak_bytes'])} | **{mib(r['peak_bytes'])}** "
                f"| {r['peak_bytes'] / rows['lora']['peak_bytes']:.2f} "
                f"| {r['peak_bytes'] / rows['dense_masked']['peak_bytes']:.2f} "
                f"| {r['step_s']:.3f} / {'–' if r['step_cpu_s'] is None else format(r['step_cpu_s'], '.3f')} "
                f"| {r['step_s'] / rows['lora']['step_s']:.2f} |"
            )
        snella, lora, dense = rows["snella"], rows["lora"], rows["dense_masked"]
        vs_lora = snella["peak_bytes"] / lora["peak_bytes"]
        saving = 1 - snella["peak_bytes"] / dense["peak_bytes"]
        lines += ["", f"SNELLA peak ÷ LoRA peak = {vs_lora:.3f} (target ≤ {TARGETS['vs_lora']}) "
                      f"{ok(vs_lora <= TARGETS['vs_lora'])}; SNELLA saves {100 * saving:.1f} % vs dense_masked "
                      f"(target ≥ {100 * TARGETS['vs_dense_saving']:.0f} %) "
                      f"{ok(saving >= TARGETS['vs_dense_saving'])}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and a 1024×1024 layer (< 1 min)")
    parser.add_argument("--d", type=int, default=32, help="low-rank dim (LoRA r = SNELLA low_rank_dim)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="fraction zeroed (SNELLA and dense_masked)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layer-dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.seq = min(args.seq, 64)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    results = {"model": bench_model(args), "layer": bench_layer(args)}
    dims = "4 layers × (256, 688), vocab 2048"
    if not args.quick:
        dims = f"{args.layers} layers × (576, 1536), vocab {args.vocab}"
    results["model_desc"] = f"Llama {dims}, all 7 projections adapted, batch {args.batch}×{args.seq} tokens"
    dim = 1024 if args.quick else args.layer_dim
    results["layer_desc"] = f"nn.Linear {dim}×{dim}, {256 if args.quick else args.tokens} tokens"
    meta = {"quick": args.quick, "torch": torch.__version__, "threads": args.threads, "d": args.d,
            "sparsity": args.sparsity, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_start": load_start, "load_end": os.getloadavg()[0],
            "machine": platform.processor() or platform.machine()}
    table = markdown(results, meta)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "snella_memory_quick" if args.quick else "snella_memory"
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
