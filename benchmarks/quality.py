"""Adaptation quality of every specpeft method against peft's LoRA, PiSSA, VeRA and LoKr on real pretrained models.

    python benchmarks/quality.py            # default size: text 24 steps × 8, image 24 steps × 16 at 32 px (see header)
    python benchmarks/quality.py --tasks text --text-steps 60 --stem quality_text &  # the committed run: one
    python benchmarks/quality.py --tasks image --image-steps 48 --stem quality_image  # process per task, then
    python benchmarks/quality.py --merge benchmarks/results/quality_text.json benchmarks/results/quality_image.json
    python benchmarks/quality.py --quick    # tiny subsets, one lr, a few steps (the smoke test's mode)

Tasks (offline, examples/assets.py):
- text: all-MiniLM-L6-v2 (BertForSequenceClassification, new 2-class head `classifier`) on Rotten Tomatoes
  fresh/rotten snippets; test = snippets of held-out movies; validation = a random slice carved from the training
  pool (disjoint from the training examples).
- image: EfficientNet-Lite0 (ImageNet weights, new 10-class head `_fc`) on Fashion-MNIST (class-balanced subsets,
  grey → 3 channels, resized, [-1, 1]); sklearn digits when Fashion-MNIST is not installed. BatchNorm statistics
  stay frozen (eval mode) so only the named trainables change.

Protocol (identical for every method): same data split, same number of steps, batch and data order per seed; AdamW
(no weight decay), linear warm-up over 10 % of the steps then linear decay to 0; the classifier head is trained in
every run (peft/specpeft `modules_to_save`) at one fixed head lr; the adapter lr is swept over a per-method grid of 3
values (4 for the vector methods SVFit, TeRA, VeRA) around the method's known good range (spectral/vector methods
need larger rates than LoRA); the lr with the best validation accuracy (seed 0) is kept and its test accuracy
reported, as mean ± std over `--seeds` seeds at that lr. The head-only row (everything frozen but the head, lr swept
for the head itself) is the floor; "untrained" is the model before any step (fresh head), the baseline the smoke
test checks improvement against.
Trainable counts exclude the head (reported in its own column). Step time: median wall seconds of the training
steps (first 2 and the profiled step excluded). Peak memory: resident bytes (parameters, buffers, AdamW state) +
the CPU allocator's peak during one profiled training step (benchmarks/_harness.step_peak_bytes).
FedSVD is trained centrally as a single client: its per-client update (B trained, A frozen with orthonormal rows),
without the server's re-factorization between rounds. EfficientNet targets every conv (stem, expand, depthwise,
project, head) as in examples/flora_efficientnet.py; a method that cannot wrap that set falls back to the pointwise
1×1 convs, and one that wraps no conv at all (peft VeRA is Linear-only) is reported as not applicable.
Results: benchmarks/results/quality{,_quick}.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
from quality_tasks import CONV_TARGETS, POINTWISE_TARGETS, Batch, Task, image_task, text_task  # noqa: E402

import specpeft  # noqa: E402

HEAD_LR = 5e-3  # the classifier head's lr in every adapter run (the middle of head-only's own grid)


# -- methods ----------------------------------------------------------------------------------------------------


@dataclass
class Method:
    """One row: how to configure it (targets, head name, total steps) → config, and its lr grid."""

    name: str
    library: str  # "specpeft", "peft" or "head" (head-only floor)
    lrs: tuple[float, ...]
    make_config: Callable[[list[str], str, int], Any] | None
    note: str = ""


def _peft(cls_name: str, **kwargs: Any) -> Callable[[list[str], str, int], Any]:
    def make(targets: list[str], head: str, steps: int) -> Any:
        import peft

        return getattr(peft, cls_name)(target_modules=targets, modules_to_save=[head], **kwargs)

    return make


METHODS: dict[str, Method] = {
    "head": Method("head only", "head", (2e-3, 5e-3, 1e-2), None, "floor: base frozen, head trained"),
    "svfit": Method("SVFit (99 % energy)", "specpeft", (3e-3, 1e-2, 3e-2, 1e-1), lambda t, h, s: specpeft.SVFitConfig(
        target_modules=t, modules_to_save=[h])),
    "soka": Method("SoKA (r_kp ≤ 4)", "specpeft", (1e-3, 3e-3, 1e-2), lambda t, h, s: specpeft.SoKAConfig(
        target_modules=t, modules_to_save=[h], max_rank=4)),
    "soka_default": Method("SoKA (default, r_kp = 1)", "specpeft", (1e-3, 3e-3, 1e-2),
                           lambda t, h, s: specpeft.SoKAConfig(target_modules=t, modules_to_save=[h])),
    "tera_default": Method("TeRA (default ranks)", "specpeft", (3e-3, 1e-2, 3e-2, 1e-1),
                           lambda t, h, s: specpeft.TeRAConfig(target_modules=t, modules_to_save=[h])),
    "tera": Method("TeRA (R=16)", "specpeft", (3e-3, 1e-2, 3e-2, 1e-1), lambda t, h, s: specpeft.TeRAConfig(
        target_modules=t, modules_to_save=[h], rank=16)),
    "tera_n2": Method("TeRA (N=2, default ranks)", "specpeft", (3e-3, 1e-2, 3e-2, 1e-1),
                      lambda t, h, s: specpeft.TeRAConfig(target_modules=t, modules_to_save=[h], tensor_order=2)),
    "flora": Method("FLoRA (r=8, s=4)", "specpeft", (1e-3, 3e-3, 1e-2), lambda t, h, s: specpeft.FLoRAConfig(
        target_modules=t, modules_to_save=[h], r=8, scale=4.0)),
    "fedsvd": Method("FedSVD (r=8, 1 client)", "specpeft", (1e-3, 3e-3, 1e-2), lambda t, h, s: specpeft.FedSVDConfig(
        target_modules=t, modules_to_save=[h], r=8, lora_alpha=8.0), "trained centrally: B trained, A frozen"),
    "snella": Method("SNELLA (d=8, 60 % sparse)", "specpeft", (2e-3, 5e-3, 1e-2), lambda t, h, s: specpeft.SNELLAConfig(
        target_modules=t, modules_to_save=[h], low_rank_dim=8, mask_mode="binary", init_sparsity=0.01,
        target_sparsity=0.6, max_layer_sparsity=0.9, total_steps=s, init_warmup=max(1, s // 10)),
        "SNELLAAllocator stepped every step"),
    "lora": Method("peft LoRA (r=8, α=16)", "peft", (1e-3, 3e-3, 1e-2), _peft("LoraConfig", r=8, lora_alpha=16)),
    "pissa": Method("peft PiSSA (r=8, α=8)", "peft", (1e-4, 3e-4, 1e-3), _peft(
        "LoraConfig", r=8, lora_alpha=8, init_lora_weights="pissa_niter_4")),
    "vera": Method("peft VeRA (r=256)", "peft", (3e-3, 1e-2, 3e-2, 1e-1), _peft("VeraConfig", r=256)),
    "lokr": Method("peft LoKr (r=8)", "peft", (1e-3, 3e-3, 1e-2), _peft("LoKrConfig", r=8, alpha=8)),
}


# -- one run ----------------------------------------------------------------------------------------------------


def build(method: Method, task: Task, seed: int, steps: int) -> tuple[nn.Module, list[str]]:
    """Fresh base (seeded head) wrapped by the method; falls back to the task's pointwise targets if needed."""
    torch.manual_seed(seed)
    base = task.make_base(seed)
    if method.library == "head":
        base.requires_grad_(False)
        getattr(base, task.head).requires_grad_(True)
        return base, []
    errors = []
    for targets in [task.targets] + ([task.fallback_targets] if task.fallback_targets else []):
        torch.manual_seed(seed)  # the adapter's random init (LoRA A, TeRA/VeRA projections) is seeded too
        config = method.make_config(list(targets), task.head, steps)
        try:
            if method.library == "peft":
                import peft

                model = peft.get_peft_model(base, config)
            else:
                model = specpeft.get_adapter_model(base, config)
            x, _ = task.val[0]
            with torch.no_grad():  # some wrappers build but cannot run a layer (e.g. "same"-padding k>1 convs)
                task.forward(model.eval(), {k: v[:2] for k, v in x.items()} if isinstance(x, dict) else x[:2])
            return model, targets
        except Exception as exc:  # noqa: BLE001 - reported in the table, then the fallback target set is tried
            errors.append(f"{type(exc).__name__} on {'/'.join(targets)}: {(str(exc) or repr(exc)).splitlines()[0][:120]}")
            base = task.make_base(seed)
    raise NotImplementedError("; ".join(errors))


def is_head(name: str, head: str) -> bool:
    return f".{head}." in f".{name}" or "modules_to_save" in name


@torch.no_grad()
def accuracy(model: nn.Module, task: Task, batches: list[Batch]) -> float:
    model.eval()
    correct = sum(int((task.forward(model, x).argmax(-1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def set_train_mode(model: nn.Module, task: Task) -> None:
    model.train()
    if task.freeze_norm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()  # frozen statistics: only the named trainables adapt


def train_run(method: Method, task: Task, lr: float, seed: int, steps: int,
              batches: list[Batch]) -> tuple[dict, nn.Module]:
    """Build, train `steps` steps, evaluate on validation; returns (counts, accuracy, step time, peak memory; model)."""
    model, targets = build(method, task, seed, steps)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if is_head(n, task.head)]
    adapter = [p for n, p in named if not is_head(n, task.head)]
    groups = [{"params": head, "lr": lr if method.library == "head" else HEAD_LR}]
    if adapter:
        groups.append({"params": adapter, "lr": lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    allocator = specpeft.SNELLAAllocator(model) if method is METHODS["snella"] else None
    profiled = steps // 2
    times, peak, resident, losses = [], 0, 0, []
    set_train_mode(model, task)
    for step, (x, y) in enumerate(batches):
        def one_step() -> None:
            loss = nn.functional.cross_entropy(task.forward(model, x), y)
            loss.backward()
            optimizer.step()
            schedule.step()
            if allocator is not None:
                allocator.step(step + 1)  # scores from this step's gradients, then the cubic budget
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())

        if step == profiled:
            state = [v for s in optimizer.state.values() for v in s.values()]
            resident = _harness.tensor_bytes([*model.parameters(), *model.buffers(), *state])
            peak = _harness.step_peak_bytes(one_step)
            continue
        start = time.perf_counter()
        one_step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return {
        "method": method.name, "task": task.name,
        "lr": lr, "seed": seed, "targets": targets,
        "trainable": _harness.count(adapter), "head_params": _harness.count(head),
        "val_acc": accuracy(model, task, task.val),
        "step_s": statistics.median(times) if times else float("nan"),
        "peak_mib": (resident + peak) / 2**20, "final_loss": statistics.fmean(losses[-max(1, steps // 10):]),
    }, model


# -- driver -----------------------------------------------------------------------------------------------------


def run_task(task: Task, keys: list[str], args: argparse.Namespace, save: Callable[[dict], Any]) -> dict:
    base = task.make_base(0)
    untrained = {"val_acc": accuracy(base, task, task.val), "test_acc": accuracy(base, task, task.test)}
    print(f"[{task.name}] {task.description}: untrained head val {untrained['val_acc']:.3f} "
          f"test {untrained['test_acc']:.3f}", flush=True)
    batches = {seed: task.train_batches(seed, args.steps[task.name]) for seed in range(args.seeds)}
    rows: list[dict] = []
    summary = {"task": task.name, "description": task.description, "sizes": task.sizes,
               "steps": args.steps[task.name], "untrained": untrained, "rows": rows}
    for key in keys:
        if rows:
            save(summary)
        method = METHODS[key]
        lrs = method.lrs if args.grid == 3 else (method.lrs[1],)
        sweep, error, best_model = [], None, None
        for lr in lrs:
            start = time.perf_counter()
            try:
                row, model = train_run(method, task, lr, 0, args.steps[task.name], batches[0])
            except NotImplementedError as exc:  # no target set could be wrapped (e.g. peft VeRA on convs)
                error = str(exc)
                break
            except Exception as exc:  # noqa: BLE001 - a failing method is reported as a row, the run goes on
                error = f"failed during training: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                break
            if best_model is None or row["val_acc"] > max(r["val_acc"] for r in sweep):
                best_model = model  # kept so the test set is evaluated only at the lr chosen on validation
            sweep.append(row)
            print(f"  {method.name:28s} lr {lr:.0e} val {row['val_acc']:.3f} loss {row['final_loss']:.3f} "
                  f"step {row['step_s']:.2f} s ({time.perf_counter() - start:.0f} s)", flush=True)
        if error is not None:
            print(f"  {method.name:28s} not applicable: {error}", flush=True)
            rows.append({"method": method.name, "key": key, "library": method.library, "error": error})
            continue
        best = max(sweep, key=lambda r: r["val_acc"])  # first of equals: the smaller lr
        best["test_acc"] = accuracy(best_model, task, task.test)
        del best_model
        runs = [best]
        for seed in range(1, args.seeds):
            row, model = train_run(method, task, best["lr"], seed, args.steps[task.name], batches[seed])
            row["test_acc"] = accuracy(model, task, task.test)
            runs.append(row)
        tests = [r["test_acc"] for r in runs]
        print(f"  {method.name:28s} chosen lr {best['lr']:.0e}: test {statistics.fmean(tests):.3f}", flush=True)
        rows.append({
            "method": method.name, "key": key, "library": method.library, "note": method.note,
            "targets": best["targets"], "trainable": best["trainable"], "head_params": best["head_params"],
            "lr_grid": list(lrs), "lr": best["lr"], "val_acc_by_lr": [r["val_acc"] for r in sweep],
            "val_acc": best["val_acc"], "test_acc_mean": statistics.fmean(tests),
            "test_acc_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "test_acc_seeds": tests,
            "step_s": statistics.median(r["step_s"] for r in sweep + runs[1:]),
            "peak_mib": statistics.median(r["peak_mib"] for r in sweep),
        })
    return summary


def markdown(results: list[dict], header: dict, args: argparse.Namespace) -> str:
    extra = (f"Protocol: same split/steps/batch/data order for all methods; AdamW (wd 0), 10 % warm-up + linear "
             f"decay; head trained in every run at lr {HEAD_LR:g}; adapter lr chosen on the validation split from a "
             f"per-method grid ({'3-4 values' if args.grid == 3 else 'middle value only (--quick)'}), test accuracy "
             f"at that lr over {args.seeds} seed(s) (mean ± std). Trainable = adapter parameters, head excluded. "
             "FedSVD is trained centrally as one client (B trained, A frozen orthonormal; no server rounds).")
    lines = ["# Adaptation quality: specpeft methods vs peft baselines", "", _harness.header_markdown(header, extra)]
    for res in results:
        s = res["sizes"]
        lines += [
            f"## {res['task']}: {res['description']}", "",
            f"{s['train']} train / {s['val']} val / {s['test']} test examples, {res['steps']} steps of batch "
            f"{s['batch']}. Untrained (fresh head, before any step): val {res['untrained']['val_acc']:.3f}, test "
            f"{res['untrained']['test_acc']:.3f}.", "",
            "| method | library | targets | trainable | head | lr grid | chosen lr | val acc by lr | val acc | "
            "test acc | step s | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            if "error" in r:
                last = r["error"].split("; ")[-1]  # the last target set tried (the fallback, when there is one)
                lines.append(f"| {r['method']} | {r['library']} | n/a: {last[:110]} | | | | | | | | | |")
                continue
            targets = "head" if not r["targets"] else ("all convs" if r["targets"] == CONV_TARGETS else
                                                        "1×1 convs" if r["targets"] == POINTWISE_TARGETS else
                                                        "/".join(r["targets"]))
            test = f"{r['test_acc_mean']:.3f}" + (f" ± {r['test_acc_std']:.3f}" if args.seeds > 1 else "")
            lines.append(
                f"| {r['method']} | {r['library']} | {targets} | {r['trainable']:,} | {r['head_params']:,} | "
                f"{', '.join(f'{v:g}' for v in r['lr_grid'])} | {r['lr']:g} | "
                f"{', '.join(f'{v:.3f}' for v in r['val_acc_by_lr'])} | {r['val_acc']:.3f} | **{test}** | "
                f"{r['step_s']:.3f} | {r['peak_mib']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        for r in res["rows"]:
            if "error" in r or r["library"] == "head":
                continue
            style = dict(marker="o", color="tab:blue") if r["library"] == "specpeft" else dict(marker="s",
                                                                                               color="tab:orange")
            ax.errorbar(r["trainable"], r["test_acc_mean"], yerr=r["test_acc_std"], capsize=3, ls="none", **style)
            ax.annotate(r["key"], (r["trainable"], r["test_acc_mean"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        head = next((r for r in res["rows"] if r.get("library") == "head" and "error" not in r), None)
        if head:
            ax.axhline(head["test_acc_mean"], color="grey", ls="--", lw=1, label="head only (floor)")
        ax.axhline(res["untrained"]["test_acc"], color="grey", ls=":", lw=1, label="untrained head")
        ax.set_xscale("log")
        ax.set_xlabel("trainable adapter parameters (head excluded, log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(res["description"], fontsize=10)
        ax.plot([], [], "o", color="tab:blue", label="specpeft")
        ax.plot([], [], "s", color="tab:orange", label="peft")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny subsets, a few steps, middle lr only, 1 seed")
    parser.add_argument("--tasks", default="text,image", help="comma list of text, image")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds at the chosen lr (default 1: the shared box's budget; use 3 for mean ± std)")
    parser.add_argument("--text-steps", type=int, default=None)
    parser.add_argument("--image-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on the shared 2-core box every op at 2 threads pays a "
                             "thread rendezvous (a MiniLM step went from ≈1 s to ≈12 s at load 7)")
    parser.add_argument("--out", default=str(_harness.RESULTS), help="output folder")
    parser.add_argument("--stem", default=None, help="output file stem (default quality, or quality_quick)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the JSON outputs of earlier runs (e.g. one per task, run side by side) into "
                             "<out>/<stem>.{md,json,png}; trains nothing")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    wall = time.perf_counter()
    header = _harness.run_header("quality", argv)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.grid, args.seeds = 1, args.seeds or 1
        args.steps = {"text": args.text_steps or 20, "image": args.image_steps or 20}
        sizes = {"text": (160, 64, 128, 8), "image": (160, 100, 200, 8, 32)}
    else:
        args.grid, args.seeds = 3, args.seeds or 1
        args.steps = {"text": args.text_steps or 24, "image": args.image_steps or 24}
        sizes = {"text": (1600, 128, 400, 8), "image": (2000, 300, 1000, 16, 32)}
    stem = args.stem or ("quality_quick" if args.quick else "quality")
    out = Path(args.out)
    results: list[dict] = []

    def save(partial: dict | None = None) -> dict:
        """Write md/json/png of everything finished so far (after every method: a cut-off run keeps its rows)."""
        done = results + ([partial] if partial else [])
        header["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        header["wall_s"] = time.perf_counter() - wall
        table = markdown(done, header, args)
        payload = {"header": header, "args": {k: v for k, v in vars(args).items()}, "results": done}
        _harness.write_outputs(out, stem, table, payload)
        plot(done, out / f"{stem}.png")
        return payload

    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        if name == "text":
            task = text_task(*sizes["text"])
        elif name == "image":
            task = image_task(*sizes["image"])
        else:
            parser.error(f"--tasks: unknown task {name!r}; use text and/or image")
        start = time.perf_counter()
        results.append(run_task(task, keys, args, save))
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)
    payload = save()
    print((out / f"{stem}.md").read_text())
    return payload


def merge(args: argparse.Namespace) -> dict:
    """One table/plot from the JSON payloads of several runs (their headers are kept, one per run)."""
    import json

    payloads = [json.loads(Path(p).read_text()) for p in args.merge]
    results = [res for p in payloads for res in p["results"]]
    first = payloads[0]
    ns = argparse.Namespace(**first["args"])
    header = dict(first["header"])
    header["command"] = " ; ".join(p["header"]["command"] for p in payloads) + \
        f" (run side by side), then merged: python benchmarks/quality.py --merge {' '.join(args.merge)}"
    header["load_average_end"] = max((p["header"]["load_average_end"] for p in payloads), key=lambda v: v[0])
    header["wall_s"] = max(p["header"]["wall_s"] for p in payloads)
    stem = args.stem or "quality"
    table = markdown(results, header, ns)
    payload = {"header": header, "runs": [p["header"] for p in payloads], "args": first["args"], "results": results}
    _harness.write_outputs(Path(args.out), stem, table, payload)
    plot(results, Path(args.out) / f"{stem}.png")
    print(table)
    return payload


if __name__ == "__main__":
    main()
