"""Pretraining images/s at batch 32 for the small and the ResNet-50 configs, measured in one run.

    .venv/bin/python benchmarks/train_throughput.py --steps 4
    .venv/bin/python benchmarks/train_throughput.py --demo --steps 20   # the demo's recipe, fp32 vs bf16
    .venv/bin/python benchmarks/train_throughput.py --demo --precisions bf16 --threads 1 &   # two 1-thread runs
    .venv/bin/python benchmarks/train_throughput.py --demo --precisions bf16 --threads 1     # side by side

`--demo` measures the recipe of `afloc demo` (small preset, 160 px, batch 16,
frozen text with cached features, whole reports, no loader workers) in fp32
and in bf16 autocast, in the same run.

Each config trains on the same synthetic cache with all three losses; the
first step (allocations, thread pools) is excluded from the timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from afloc_cli.synth import SynthConfig, generate_corpus
from train.config import load_config
from train.data import FrameCache, prepare_cache
from train.loop import Trainer


def measure(preset: str, cache: Path, out: Path, batch: int, steps: int, extra: list[str]) -> float:
    cfg = load_config(None, [f"preset={preset}", f"batch_size={batch}", f"max_steps={steps + 1}", "epochs=100",
                             "checkpoint_every=0", "val_every=0", "workers=1", "precision=fp32", "val_batches=0",
                             *extra])
    trainer = Trainer(cfg, FrameCache(cache), out)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(row: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer.fit(on_step=on_step)
    timed = times[1:]  # the first step warms up
    return batch * len(timed) / sum(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--presets", default="small,resnet50")
    parser.add_argument("--demo", action="store_true", help="the demo's recipe, fp32 vs bf16")
    parser.add_argument("--precisions", default="fp32,bf16", help="--demo: the precisions to measure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo:
        demo(args.steps, args.precisions.split(","))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        generate_corpus(corpus, SynthConfig(n=max(64, args.batch_size * 3), seed=2), workers=1)
        cache = Path(tmp) / "cache"
        prepare_cache(corpus / "manifest.csv", cache, size=224, workers=1)
        for preset in args.presets.split(","):
            rate = measure(preset, cache, Path(tmp) / f"run-{preset}", args.batch_size, args.steps, [])
            rows.append((preset, rate))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"pretraining, batch {args.batch_size}, 224 input, fp32, losses global+sentence+word, "
          f"text model fine-tuned, {args.steps} timed steps")
    print(f"{'config':<12}{'images/s':>10}")
    for preset, rate in rows:
        print(f"{preset:<12}{rate:>10.2f}")


def demo(steps: int, precisions: list[str]) -> None:
    from afloc_cli.demo import DemoPlan

    plan = DemoPlan.full()
    recipe = [f"model.preprocess.image_size={plan.image_size}", "freeze_text=true", *plan.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        generate_corpus(corpus, SynthConfig(n=160, seed=2), workers=1)
        cache = Path(tmp) / "cache"
        prepare_cache(corpus / "manifest.csv", cache, size=plan.image_size, workers=1)
        for precision in precisions:
            # epochs=100 over a 112-image train split: texts repeat, as in the demo's later epochs.
            rate = measure("small", cache, Path(tmp) / f"run-{precision}", plan.batch_size, steps,
                           [*recipe, f"precision={precision}"])
            rows.append((precision, rate))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"demo recipe: small preset, {plan.image_size} px, batch {plan.batch_size}, frozen text (cached), "
          f"{' '.join(plan.overrides)}, {steps} timed steps")
    print(f"{'precision':<12}{'images/s':>10}")
    for precision, rate in rows:
        print(f"{precision:<12}{rate:>10.2f}")
    rates = dict(rows)
    if {"fp32", "bf16"} <= set(rates):
        print(f"bf16 / fp32: {rates['bf16'] / rates['fp32']:.2f}")


if __name__ == "__main__":
    main()
