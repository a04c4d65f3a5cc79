"""benchmarks/_harness.py's paired ratio: load shared by both variants of a round cancels, and the interval is the
percentile bootstrap of the median (checked against numpy's percentile of the same resamples)."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
from benchmark_modules import load_benchmark

harness = load_benchmark("_harness", "bench_harness")


def _times(ratios: list[float]) -> dict[str, list[float]]:
    """Rounds whose reference times vary (load) while "mine" ÷ "ref" is `ratios`."""
    load = [1.0 + 0.37 * (i % 5) for i in range(len(ratios))]
    return {"ref": [0.5 * s for s in load], "mine": [0.5 * s * r for s, r in zip(load, ratios)]}


def test_paired_ratio_cancels_drift_between_rounds() -> None:
    load = [1.0, 2.0, 1.2, 3.0, 1.1, 1.4, 2.5, 1.05, 1.3]  # the box's slowdown in each round, shared by both variants
    times = {"ref": [0.5 * s for s in load], "mine": [0.6 * s for s in load]}
    times["mine"][4] *= 3.0  # one round where only "mine" was hit
    ratio = harness.paired_ratio(times, "mine", "ref")
    assert ratio["median"] == pytest.approx(1.2)
    # the ratio of medians takes its two medians from different rounds: 0.84 / 0.65 here
    assert statistics.median(times["mine"]) / statistics.median(times["ref"]) == pytest.approx(0.84 / 0.65)


@pytest.mark.parametrize("ratios", [
    [0.9, 1.0, 1.05, 1.1, 1.2, 1.3, 0.95, 1.15, 1.02, 0.98, 1.07],
    [1 + 0.4 * u for u in np.random.default_rng(1).random(400)],  # many distinct values: another seed moves it
    [1.0] * 19 + [5.0, 6.0],  # skewed: the interval stays at 1.0 where the raw min/max or percentiles would not
])
def test_paired_ratio_interval_is_percentile_bootstrap_of_median(ratios: list[float]) -> None:
    ratio = harness.paired_ratio(_times(ratios), "mine", "ref", resamples=2000)
    rng = random.Random(0)  # the same resamples, summarized independently
    medians = [statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000)]
    low, high = np.percentile(medians, [2.5, 97.5])
    assert ratio["median"] == pytest.approx(statistics.median(ratios))
    assert (ratio["low"], ratio["high"]) == pytest.approx((low, high))
    assert ratio["low"] <= ratio["median"] <= ratio["high"]


def test_paired_ratio_degenerate_cases() -> None:
    same = harness.paired_ratio(_times([1.25] * 12), "mine", "ref")
    assert same == pytest.approx({"median": 1.25, "low": 1.25, "high": 1.25})
    few = harness.paired_ratio(_times([1.0, 1.2, 1.5]), "mine", "ref")  # too few rounds for an interval
    assert few["median"] == pytest.approx(1.2) and few["low"] is None and few["high"] is None
    spread = [0.9 + 0.03 * i for i in range(9)]
    assert harness.paired_ratio(_times(spread[:8]), "mine", "ref")["low"] is None  # 8 rounds: none
    nine = harness.paired_ratio(_times(spread), "mine", "ref")  # 9 rounds: an interval, the same on every call
    assert nine["low"] is not None and nine == harness.paired_ratio(_times(spread), "mine", "ref")
    assert harness.interval(few) is None and harness.ratio_cell(few["median"]) == "1.20"
    assert harness.ratio_cell(1.234, 1.1, 1.3) == "1.23 [1.10, 1.30]" and harness.ratio_cell(None) == "—"
    with pytest.raises(ValueError):  # rounds must pair up
        harness.paired_ratio({"ref": [1.0] * 9, "mine": [1.0] * 10}, "mine", "ref")


def test_ratio_columns_and_cells_match_paired_ratio() -> None:
    """A row's ratio columns hold each pair's `paired_ratio` median and interval (None for no pair) and render as
    `ratio_cell`s: "1.07 [1.02, 1.11]" with an interval, "—" without a pair."""
    times = {"a": [1.0 + 0.01 * i for i in range(12)], "b": [0.9 + 0.02 * (i % 5) for i in range(12)], "c": [1.0] * 12}
    row = harness.ratio_columns(times, {"ab": ("a", "b"), "ac": ("a", "c"), "none": None})
    for key, (label, reference) in {"ab": ("a", "b"), "ac": ("a", "c")}.items():
        want = harness.paired_ratio(times, label, reference)
        assert row[key] == want["median"] and row["intervals"][key] == [want["low"], want["high"]]
    assert row["none"] is None and row["intervals"]["none"] is None
    cells = harness.ratio_cells(row, ("ab", "none"))
    low, high = row["intervals"]["ab"]
    assert cells == f"{row['ab']:.2f} [{low:.2f}, {high:.2f}] | —"
