"""Localize throughput: end-to-end images/s vs encoder-only, and 100 prompts vs 1, measured in one run.

Targets (issue 4): end-to-end >= 0.9 x encoder-only at the same batch and
precision; 100 prompts <= 1.05 x the time of 1 prompt.

    .venv/bin/python benchmarks/localize_throughput.py --config resnet50 --images 48 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from afloc_cli.config import ModelConfig, small_config
from afloc_cli.localize.runner import run_localize
from afloc_cli.synth import SynthConfig, generate_corpus
from afloc_cli.vlp.inference_engine import LocalizationEngine
from afloc_cli.vlp.model import build_model

PROMPTS = [f"finding number {i} in the left lower zone" for i in range(100)]


def encoder_only(engine: LocalizationEngine, n: int, batch: int) -> float:
    frames = torch.randint(0, 255, (batch, engine.image_size, engine.image_size), dtype=torch.uint8)
    engine(frames)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < n:
        engine(frames)
        done += batch
    return done / (time.perf_counter() - start)


def end_to_end(engine: LocalizationEngine, paths: list[Path], prompts: list[str], batch: int, workers: int,
               out: Path) -> float:
    start = time.perf_counter()
    summary = run_localize(engine, paths=paths, indices=list(range(len(paths))), prompts=prompts, out=out,
                           checkpoint_sha256="bench", batch_size=batch, workers=workers, overwrite=True)
    assert summary.failed == 0, summary.failures[:3]
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", choices=["small", "resnet50"], default="resnet50")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many interleaved runs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cfg = small_config() if args.config == "small" else ModelConfig()
    model = build_model(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        generate_corpus(corpus, SynthConfig(n=args.images, seed=1), workers=1)
        paths = sorted(p for p in corpus.rglob("*") if p.suffix in (".png", ".dcm"))[: args.images]
        one = LocalizationEngine(model, PROMPTS[:1], device=torch.device("cpu"))
        many = LocalizationEngine(model, PROMPTS, device=torch.device("cpu"))
        # Best of `repeats`, interleaved, so a burst of load on a shared machine hits no single row.
        enc = e2e_1 = e2e_100 = 0.0
        for _ in range(args.repeats):
            enc = max(enc, encoder_only(one, len(paths), args.batch_size))
            e2e_1 = max(e2e_1, end_to_end(one, paths, PROMPTS[:1], args.batch_size, args.workers,
                                          Path(tmp) / "one.h5"))
            e2e_100 = max(e2e_100, end_to_end(many, paths, PROMPTS, args.batch_size, args.workers,
                                              Path(tmp) / "many.h5"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {args.threads}")
    print(f"config {args.config}, {len(paths)} images (synthetic PNG 8/16 + DICOM), batch {args.batch_size}, "
          f"fp32, {args.workers} decode workers, best of {args.repeats} interleaved runs")
    print(f"{'measure':<40}{'images/s':>10}")
    print(f"{'encoder-only forward (pre-decoded)':<40}{enc:>10.2f}")
    print(f"{'end-to-end, 1 prompt':<40}{e2e_1:>10.2f}")
    print(f"{'end-to-end, 100 prompts':<40}{e2e_100:>10.2f}")
    print(f"ratio end-to-end / encoder-only (1 prompt): {e2e_1 / enc:.3f}  (target >= 0.9)")
    print(f"time ratio 100 prompts / 1 prompt: {e2e_1 / e2e_100:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
