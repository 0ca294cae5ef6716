"""Speed of the metrics module at benchmark scale: the bootstrap and per-item scoring, measured in one run.

    .venv/bin/python benchmarks/metrics_speed.py

The bootstrap target (issue 5): 10,000 items x 1,000 resamples in seconds, so a
whole-dataset benchmark never waits on its confidence intervals.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from afloc_cli.benchmark import metrics as M


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(3)
    values = rng.random((10_000, 12))
    codes = rng.integers(0, 8, 10_000)
    boot = best_of(lambda: M.bootstrap_macro(values, codes, n_boot=1000, seed=0))
    heat = rng.random((224, 224)).astype(np.float32) * 2 - 1
    truth = np.zeros((224, 224), dtype=bool)
    truth[60:120, 40:110] = True
    n_items = 1000
    score = best_of(lambda: [M.score_item(heat, truth, M.DEFAULT_THRESHOLDS) for _ in range(n_items)])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, torch {torch.__version__}")
    print(f"bootstrap_macro, 10,000 items x 12 metrics x 1,000 resamples: {boot:.2f} s (best of 3)")
    print(f"score_item, 224x224 map, {len(M.DEFAULT_THRESHOLDS)} thresholds: {n_items / score:.0f} items/s (best of 3)")


if __name__ == "__main__":
    main()
