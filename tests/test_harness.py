"""benchmarks/_harness.py's paired ratio: load shared by both variants of a round cancels; the interval brackets the
median and narrows to it when every round agrees."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_harness():
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "benchmarks" / "_harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_harness"] = module
    spec.loader.exec_module(module)
    return module


def test_paired_ratio_cancels_drift_between_rounds() -> None:
    harness = _load_harness()
    load = [1.0, 2.0, 1.2, 3.0, 1.1]  # the box's slowdown in each round, shared by both variants
    times = {"ref": [0.5 * s for s in load], "mine": [0.6 * s for s in load]}
    times["mine"][4] *= 3.0  # one round where only "mine" was hit
    ratio = harness.paired_ratio(times, "mine", "ref")
    assert ratio["median"] == pytest.approx(1.2)
    assert ratio["low"] == pytest.approx(1.2) and ratio["high"] <= 3.6 + 1e-12
    # the ratio of medians takes its two medians from different rounds: 1.2 / 0.6 here
    assert statistics.median(times["mine"]) / statistics.median(times["ref"]) == pytest.approx(2.0)


def test_paired_ratio_interval_brackets_median() -> None:
    harness = _load_harness()
    ratios = [0.9, 1.0, 1.05, 1.1, 1.2, 1.3, 0.95, 1.15]
    times = {"ref": [1.0] * len(ratios), "mine": ratios}
    ratio = harness.paired_ratio(times, "mine", "ref")
    assert ratio["median"] == statistics.median(ratios)
    assert min(ratios) <= ratio["low"] <= ratio["median"] <= ratio["high"] <= max(ratios)
    assert ratio["low"] < ratio["high"]
    assert harness.paired_ratio(times, "mine", "ref") == ratio  # seeded: the same interval every run
